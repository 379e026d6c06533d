"""Starting Composer's launcher on every node with what the scheduler granted.

    python -m slm.launch [--print] [--debug] slm/train.py CONFIG.yaml [key=value ...]

runs `composer -n NPROC --world_size W --node_rank R --master_addr HOST --master_port PORT ...`
(Composer's launcher, in this process) with the numbers taken from the environment: Slurm
(`SLURM_*`, one launcher per node via `srun`), SGE (`$PE_HOSTFILE` of a parallel environment), or
a single node. NPROC is the number
of GPUs this node was given, or 1 on a CPU-only node. `--print` shows the command instead;
`--debug` shows the full traceback of an error.
The launcher ignores SIGTERM/SIGUSR1/SIGUSR2, which the training processes answer with a
checkpoint and exit status 75 (slm/preemption.py), and exits with their status. It leaves the first
Ctrl-C to them as well (a checkpoint at the batch end, exit 130), however long that batch takes; at a
second it stops them as Composer's launcher does (SIGTERM, SIGKILL 30 s later or at a third).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from slm.errors import SlmError, run_command

DEFAULT_PORT = 29500
# The contract between the job scripts and training (slm/preemption.py): these signals mean "checkpoint
# and stop", and a run stopped that way exits with EX_TEMPFAIL, which jobs/* turn into a requeue.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_PREEMPTED = 75
# A run stopped by Ctrl-C (SIGINT) after saving a checkpoint: the shell's status for an interrupt, never requeued.
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Launch:
    nproc: int  # processes on this node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def composer_args(self) -> list[str]:
        return ["-n", str(self.nproc), "--world_size", str(self.nproc * self.nodes), "--node_rank",
                str(self.node_rank), "--master_addr", self.master_addr, "--master_port", str(self.master_port)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. 'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(first), int(last or first) + 1)]
    return hosts


def _port(env: Mapping[str, str], job_id: str | None) -> int:
    """MASTER_PORT if set; else one per job (jobs sharing a node must not share a port)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return DEFAULT_PORT + (int(job_id) % 10000 if job_id and job_id.isdigit() else 0)


def gpus_on_this_node(env: Mapping[str, str]) -> int:
    """GPUs this node may use: those visible (CUDA_VISIBLE_DEVICES as Slurm sets it, else what torch sees), at
    most the number granted where the scheduler says it without hiding the others (SLURM_GPUS_ON_NODE, or
    SLM_GPUS, which jobs/train.sh reads from SGE's `-l gpu=N`)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        import torch

        count = torch.cuda.device_count()
    granted = env.get("SLURM_GPUS_ON_NODE") or env.get("SLM_GPUS")
    return min(count, int(granted)) if granted and granted.isdigit() else count


def from_environment(env: Mapping[str, str], gpus: int, hostname: str) -> Launch:
    """The launch of this node, from a Slurm or SGE job's environment (a single node otherwise)."""
    nproc = max(gpus, 1)
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1) > 1:
        hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        if not hosts:
            raise SlmError("SLURM_JOB_NODELIST is empty: cannot tell the master node")
        return Launch(nproc, len(hosts), int(env.get("SLURM_NODEID", 0)), env.get("MASTER_ADDR") or hosts[0],
                      _port(env, env.get("SLURM_JOB_ID")))
    if env.get("PE_HOSTFILE") and Path(env["PE_HOSTFILE"]).is_file():
        hosts = [line.split()[0] for line in Path(env["PE_HOSTFILE"]).read_text().splitlines() if line.strip()]
        if len(hosts) > 1:
            short = [h.split(".")[0] for h in hosts]
            if hostname.split(".")[0] not in short:
                raise SlmError(f"this host ({hostname}) is not in $PE_HOSTFILE ({', '.join(hosts)})")
            return Launch(nproc, len(hosts), short.index(hostname.split(".")[0]), env.get("MASTER_ADDR") or hosts[0],
                          _port(env, env.get("JOB_ID")))
    return Launch(nproc, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1",
                  _port(env, env.get("SLURM_JOB_ID") or env.get("JOB_ID")))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = set()
    while args and args[0] in ("--print", "--debug"):
        flags.add(args.pop(0))
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return run_command("slm launch", lambda: launch(args, show="--print" in flags), "--debug" in flags)


def launch(args: list[str], show: bool) -> int:
    """Print, or run, the composer launcher for this node; its exit status."""
    gpus = gpus_on_this_node(os.environ)
    plan = from_environment(os.environ, gpus, socket.gethostname())
    command = [str(Path(sys.executable).parent / "composer"), *plan.composer_args(), *args]
    if show:
        print(" ".join(command))
        return 0
    print(f"slm launch: node {plan.node_rank + 1} of {plan.nodes} ({socket.gethostname()}): {plan.nproc} "
          f"training process(es) on {f'{gpus} GPU(s)' if gpus else 'the CPU'}", file=sys.stderr, flush=True)
    # Composer's launcher, run in this process. Importing composer sets its own SIGTERM and SIGINT handlers
    # (sys.exit, after which the launcher kills the training processes 30 s later): ours replace them.
    from composer.cli import launcher

    # Schedulers signal every process of the job: the training processes checkpoint and stop
    # (slm.preemption); the launcher must outlive them, so it ignores the signals (they inherit that
    # until they install their own handlers, which keeps a signal during start-up from killing them).
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Ctrl-C reaches the training processes too. The first is theirs to answer (they start with Python's
    # default handling: a handled signal is reset at exec); at a second, Composer's launcher stops them.
    signal.signal(signal.SIGINT, _second_ctrl_c)
    os.environ["SLM_LAUNCH"] = "1"  # tells the training processes that their launcher waits for them
    sys.argv = command
    return launcher.main()


_ctrl_c = 0


def _second_ctrl_c(signum: int, frame: object) -> None:
    global _ctrl_c
    _ctrl_c += 1
    if _ctrl_c > 1:
        raise KeyboardInterrupt  # Composer's launcher: SIGTERM to the training processes, SIGKILL at the next


if __name__ == "__main__":
    sys.exit(main())

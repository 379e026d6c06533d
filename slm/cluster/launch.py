"""Starting Composer's launcher on every node with what the scheduler granted.

    python -m slm.cluster.launch [--print] [--debug] slm/train.py CONFIG.yaml [key=value ...] [--next CONFIG.yaml
    ...]...

runs `composer -n NPROC --world_size W --node_rank R --master_addr HOST --master_port PORT ...`
(Composer's launcher, in this process) with the numbers taken from the environment: Slurm
(`SLURM_*`, one launcher per node via `srun`), SGE (`$PE_HOSTFILE` of a parallel environment), or
a single node. NPROC is the number
of GPUs this node was given, or 1 on a CPU-only node. `--print` shows the command instead;
`--debug` shows the full traceback of an error.
The launcher ignores SIGTERM/SIGUSR1/SIGUSR2, which the training processes answer with a
checkpoint and exit status 75 (slm/training/preemption.py), and exits with their status. It leaves the first
Ctrl-C to them as well (a checkpoint at the batch end, exit 130), however long that batch takes; at a
second it stops them as Composer's launcher does (SIGTERM, SIGKILL 30 s later or at a third).

Several runs on one node (`--next` starts the next run's arguments; `slm sweep --per-device K` writes them):
tiny models leave a device mostly idle, so K runs share it, each a launcher of its own as above, each its own
run_name (each resumes alone). On a CPU-only node the cores are split between them (each pinned to its share,
OMP_NUM_THREADS set to it); with GPUs every run uses all of this node's, through CUDA MPS where the node has
`nvidia-cuda-mps-control` (a daemon of this job's, stopped at the end), time-sliced otherwise. Every process of
the job receives the scheduler's signals; the exit status is 75 if any run stopped that way (the job requeues
and every run resumes; finished ones change nothing), else the first failure's, else 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slm.core.errors import SlmError, run_command

DEFAULT_PORT = 29500
# The contract between the job scripts and training (slm/training/preemption.py): these signals mean "checkpoint
# and stop", and a run stopped that way exits with EX_TEMPFAIL, which jobs/* turn into a requeue.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_PREEMPTED = 75
# A run stopped by Ctrl-C (SIGINT) after saving a checkpoint: the shell's status for an interrupt, never requeued.
EXIT_INTERRUPTED = 130
NEXT = "--next"  # starts the next run's arguments: several runs share this node


@dataclass(frozen=True)
class Launch:
    """How to start this node's training processes: Composer's launcher flags for them."""
    nproc: int  # processes on this node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int | None  # None: a free one, which Composer's launcher picks (one node only)

    def composer_args(self) -> list[str]:
        """Return Composer's launcher flags for this node: processes, world size, node rank, master address and port."""
        port = [] if self.master_port is None else ["--master_port", str(self.master_port)]
        return ["-n", str(self.nproc), "--world_size", str(self.nproc * self.nodes), "--node_rank",
                str(self.node_rank), "--master_addr", self.master_addr, *port]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. 'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07',
    'cpu5']."""
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
    """Return the port every node of a job agrees on: MASTER_PORT if set; else one per job (jobs sharing a node must
    not share a port)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return DEFAULT_PORT + (int(job_id) % 10000 if job_id and job_id.isdigit() else 0)


def gpus_on_this_node(env: Mapping[str, str]) -> int:
    """Count the GPUs this node may use: those visible (CUDA_VISIBLE_DEVICES as Slurm sets it, else what torch sees), at
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
    """Return the launch of this node, from a Slurm or SGE job's environment (a single node otherwise)."""
    nproc = max(gpus, 1)
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1) > 1:
        hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        if not hosts:
            raise SlmError("SLURM_JOB_NODELIST is empty: cannot tell the master node")
        return Launch(nproc, len(hosts), int(env.get("SLURM_NODEID", 0)), env.get("MASTER_ADDR") or hosts[0],
                      _port(env, env.get("SLURM_JOB_ID")))
    # The hosts of an SGE parallel environment: its $PE_HOSTFILE on the job's first host; the other hosts'
    # launchers, started there by `qrsh -inherit` (jobs/train.sh), have no hostfile and are given SLM_PE_HOSTS.
    hostfile = Path(env["PE_HOSTFILE"]) if env.get("PE_HOSTFILE") else None
    if hostfile and hostfile.is_file():
        hosts = [line.split()[0] for line in hostfile.read_text().splitlines() if line.strip()]
    else:
        hosts = env.get("SLM_PE_HOSTS", "").split()
    if len(hosts) > 1:
        short = [h.split(".")[0] for h in hosts]
        if hostname.split(".")[0] not in short:
            raise SlmError(f"this host ({hostname}) is not among the job's hosts ({', '.join(hosts)})")
        return Launch(nproc, len(hosts), short.index(hostname.split(".")[0]), env.get("MASTER_ADDR") or hosts[0],
                      _port(env, env.get("JOB_ID")))
    # One node: MASTER_PORT if set, else a port free this moment, which Composer's launcher picks (a fixed one
    # would make two launches on one machine, from two terminals or two jobs, collide).
    return Launch(nproc, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1",
                  int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)


def split_runs(args: list[str]) -> list[list[str]]:
    """Split `SCRIPT A.yaml k=v --next B.yaml k=v` -> [[SCRIPT, A.yaml, k=v], [SCRIPT, B.yaml, k=v]]."""
    runs: list[list[str]] = [[]]
    for arg in args:
        if arg == NEXT:
            runs.append([args[0]])
        else:
            runs[-1].append(arg)
    empty = next((i for i, run in enumerate(runs) if len(run) < 2), None)
    if empty is not None:
        raise SlmError(f"run {empty + 1} of {len(runs)} has no arguments: give each {NEXT} a CONFIG.yaml")
    return runs


def core_shares(cores: list[int], runs: int) -> list[list[int]]:
    """Split the node's cores into `runs` contiguous shares, as even as they go."""
    if runs > len(cores):
        raise SlmError(f"{runs} runs on a node with {len(cores)} CPU core(s) for this job: at most one run a core "
                       f"(ask for more cores, or fewer runs a device with --per-device)")
    size, extra = divmod(len(cores), runs)
    starts = [i * size + min(i, extra) for i in range(runs + 1)]
    return [cores[starts[i]:starts[i + 1]] for i in range(runs)]


def granted_cores(env: Mapping[str, str]) -> list[int]:
    """Return the cores this job may use: its affinity, at most as many as the scheduler granted (Slurm's
    SLURM_CPUS_PER_TASK, SGE's NSLOTS) where it does not pin the job itself."""
    cores = sorted(os.sched_getaffinity(0))
    granted = env.get("SLURM_CPUS_PER_TASK") or env.get("NSLOTS")
    return cores[:int(granted)] if granted and granted.isdigit() and int(granted) > 0 else cores


@contextmanager
def cuda_mps(gpus: int) -> Iterator[dict[str, str]]:
    """Yield the environment that puts a process on this job's CUDA MPS daemon, started here and stopped afterwards;
    empty (the GPU time-sliced) without GPUs, without `nvidia-cuda-mps-control`, or where one is set up already."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not gpus or not control or os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="slm-mps-") as folder:
        env = {"CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
        started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
        if started.returncode != 0:
            print(f"slm launch: CUDA MPS did not start ({started.stderr.strip() or started.returncode}): the runs "
                  "share the GPU time-sliced", file=sys.stderr, flush=True)
            yield {}
            return
        try:
            yield env
        finally:
            subprocess.run([control], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True)


def share_node(runs: list[list[str]], show: bool) -> int:
    """Run several `slm.cluster.launch` commands on this node at once (the module's docstring); return their combined
    status."""
    gpus = gpus_on_this_node(os.environ)
    plan = from_environment(os.environ, gpus, socket.gethostname())
    if plan.nodes > 1:
        raise SlmError(f"{len(runs)} runs share one node ({NEXT}), but this job spans {plan.nodes}: give it one node")
    shares = [[] for _ in runs] if gpus else core_shares(granted_cores(os.environ), len(runs))
    commands = [[sys.executable, "-m", "slm.cluster.launch", *run] for run in runs]
    envs = [({"MASTER_PORT": str(plan.master_port + i)} if plan.master_port is not None else {}) |
            ({"OMP_NUM_THREADS": str(len(share))} if share else {}) for i, share in enumerate(shares)]
    if show:
        for command, env, share in zip(commands, envs, shares, strict=True):
            cores = f"taskset -c {','.join(map(str, share))} " if share else ""
            print(" ".join([*(f"{k}={v}" for k, v in env.items()), cores + " ".join(command)]))
        return 0
    where = f"{gpus} GPU(s)" if gpus else "CPU cores " + " | ".join(",".join(map(str, s)) for s in shares)
    print(f"slm launch: {len(runs)} runs share this node ({socket.gethostname()}): {where}", file=sys.stderr,
          flush=True)
    for sig in SIGNALS:  # every process of the job gets them: the runs checkpoint and stop, this one waits
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # each run's launcher answers Ctrl-C; reset at exec
    with cuda_mps(gpus) as mps:
        procs = [subprocess.Popen(command, env={**os.environ, **env, **mps},
                                  preexec_fn=(lambda share=share: os.sched_setaffinity(0, share)) if share else None)
                 for command, env, share in zip(commands, envs, shares, strict=True)]
        statuses = [proc.wait() for proc in procs]
    for i, (run, status) in enumerate(zip(runs, statuses, strict=True)):
        print(f"slm launch: run {i + 1} of {len(runs)} ({' '.join(run[1:])}) exited {status}", file=sys.stderr,
              flush=True)
    if EXIT_PREEMPTED in statuses:
        return EXIT_PREEMPTED
    return next((s for s in statuses if s), 0)


def main(argv: list[str] | None = None) -> int:
    """Run `python -m slm.cluster.launch [--print] [--debug] slm/train.py ARGS...` and return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    flags = set()
    while args and args[0] in ("--print", "--debug"):
        flags.add(args.pop(0))
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    if NEXT in args:
        return run_command("slm launch", lambda: share_node(split_runs(args), show="--print" in flags),
                           "--debug" in flags)
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
    # (slm.training.preemption); the launcher must outlive them, so it ignores the signals (they inherit that
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
    """Count a Ctrl-C (the launcher's SIGINT handler): the first is the training processes' to answer; at the second,
    raise KeyboardInterrupt so that Composer's launcher stops them."""
    global _ctrl_c
    _ctrl_c += 1
    if _ctrl_c > 1:
        raise KeyboardInterrupt  # Composer's launcher: SIGTERM to the training processes, SIGKILL at the next


if __name__ == "__main__":
    sys.exit(main())

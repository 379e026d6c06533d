"""Real single-node Slurm and SGE clusters on localhost for the job-script tests, and the two test hosts
(tests/two_hosts.sh) for one run across hosts.

Both come from the OS packages (installed here when missing, as root) and run as they would on a
cluster's head and compute node at once. The node advertises what a small GPU node has (16 cores,
64 GB, 2 GPUs) so the job scripts' default requests are granted unchanged; there is no GPU behind
the advertised ones, so training sees none and runs one process on the CPU, as on a CPU-only node.
Every daemon a cluster starts is stopped by its own pid; a daemon that was already running is left alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "gridengine-master", "gridengine-exec", "gridengine-client"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "munged", "sge_qmaster", "sge_execd", "qsub"]
CPUS, MEMORY_MB, GPUS = 16, 64000, 2
INSTALL_LOCK = "/tmp/slm-install-schedulers.lock"
# How long a test waits for a job to end: a guard against a hang, not a speed check. On a busy machine (make test
# BUSY=2) a 16-batch one-node job took over 300 s.
JOB_TIMEOUT = 900


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def install_schedulers() -> str | None:
    """Install Slurm, munge and SGE from the OS packages if missing; why they cannot be, or None."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0:
        return "Slurm/SGE are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "Slurm/SGE are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    with open(INSTALL_LOCK, "w") as lock:  # make test's sessions start at once: one installs, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(shutil.which(p) for p in PROGRAMS) and \
                subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip().splitlines()[-1:]}"
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    return f"installed, but {', '.join(missing)} not found" if missing else None


def _kill(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 20, f"pid {pid} to exit", 0.2)
    except ProcessLookupError:
        return
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _start(command: list[str], pid_file: Path, env: dict[str, str] | None = None) -> int:
    """Start a daemon and return its pid, read from the pid file it writes (a stale one is removed first)."""
    pid_file.unlink(missing_ok=True)
    subprocess.run(command, env=env, check=True, capture_output=True)
    return int(wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), 20, f"{pid_file}").split()[0])


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Slurm:
    """slurmctld + slurmd (and munged if none runs) with their own config, state and logs in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.pids: list[int] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        self._start_munge()
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "gpu0").touch()  # the advertised GPUs' device files: plain files, nothing behind them
        (root / "gpu1").touch()
        (root / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={root}/gpu[0-1]\n")
        (root / "slurm.conf").write_text(f"""Include {Path(__file__).parent / "slurm-common.conf"}
ClusterName=slmtest
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
KillWait=60
NodeName=localhost CPUs={CPUS} RealMemory={MEMORY_MB} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.pids.append(_start(["slurmctld"], root / "slurmctld.pid", self.env))
        self.pids.append(_start(["slurmd"], root / "slurmd.pid", self.env))
        wait_until(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, 60, "the Slurm node")

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is running already: use it, leave it
        run_dir = Path("/run/munge")
        run_dir.mkdir(exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        self.pids.append(_start(["runuser", "-u", "munge", "--", "munged"], run_dir / "munged.pid"))

    def submit(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """sbatch ARGS: the job id. The job gets sbatch's environment: this cluster's, plus `env`."""
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def finished(self, job_id: int | str) -> dict[str, str] | None:
        """The job's fields once it has ended for good, else None (a requeued job waits cred_expire, 5 s, first)."""
        info = self.job(job_id)
        return info if info["JobState"] in FINISHED else None

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        try:
            wait_until(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 90, "the jobs to end")
        except TimeoutError:
            pass
        for pid in reversed(self.pids):
            _kill(pid)


class SGE:
    """sge_qmaster + sge_execd of the OS package's default cell, set up as a one-host cluster.

    The cell is the system's (/var/lib/gridengine/default): it is configured only when its master is
    unset or already `localhost`, so a real cluster's configuration is never touched.
    """

    ROOT = Path("/var/lib/gridengine")
    SPOOL = Path("/var/spool/gridengine")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SGE_ROOT": str(self.ROOT), "SGE_CELL": "default"}
        self.pids: list[int] = []

    def usable(self) -> str | None:
        """Why this machine's SGE cell is not ours to configure, or None."""
        master = self.ROOT / "default" / "common" / "act_qmaster"
        if not master.parent.is_dir():
            return f"no SGE cell at {master.parent}"
        current = master.read_text().strip() if master.exists() else ""
        return None if current in ("", "localhost") else f"SGE cell already set up for master {current}"

    def qconf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        for _ in range(20):  # a qmaster just started drops the first connections now and then
            proc = subprocess.run(["qconf", *args], env=self.env, capture_output=True, text=True, timeout=60)
            if "commlib error" not in proc.stderr:
                break
            time.sleep(0.5)
        if check and proc.returncode != 0:
            raise RuntimeError(f"qconf {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _load(self, option: str, name: str, text: str) -> None:
        """Add (-A*) or, if it exists, modify (-M*) an object from a file called `name`."""
        path = self.root / name
        path.write_text(text)
        if self.qconf(f"-A{option}", str(path), check=False).returncode != 0:
            self.qconf(f"-M{option}", str(path))

    def start(self) -> None:
        common = self.ROOT / "default" / "common"
        self.root.mkdir(parents=True, exist_ok=True)
        (common / "host_aliases").write_text(f"localhost {socket.gethostname()}\n")
        (common / "act_qmaster").write_text("localhost\n")
        self.pids.append(_start(["sge_qmaster"], self.SPOOL / "qmaster" / "qmaster.pid", self.env))
        wait_until(lambda: self.qconf("-sh", check=False).returncode == 0, 60, "sge_qmaster")

        conf = self.qconf("-sconf").stdout  # root may submit (min_uid/min_gid 0)
        (self.root / "global").write_text(re.sub(r"(?m)^(min_[ug]id\s+)\d+", r"\g<1>0", conf))
        self.qconf("-Mconf", str(self.root / "global"))
        sched = self.qconf("-ssconf").stdout  # schedule at once, not every 15 s
        sched = re.sub(r"(?m)^schedule_interval\s+\S+", "schedule_interval 0:0:1", sched)
        sched = re.sub(r"(?m)^flush_(submit|finish)_sec\s+\S+", r"flush_\1_sec 1", sched)
        (self.root / "sched").write_text(sched)
        self.qconf("-Msconf", str(self.root / "sched"))
        self.qconf("-ah", "localhost", check=False)
        self.qconf("-as", "localhost", check=False)
        # GPUs as sites define them: a count consumed per job (not per slot of the job's parallel environment)
        complexes = re.sub(r"(?m)^gpu\s.*\n", "", self.qconf("-sc").stdout) + "gpu gpu INT <= YES JOB 0 0\n"
        (self.root / "complexes").write_text(complexes)
        self.qconf("-Mc", str(self.root / "complexes"))
        self._load("e", "exechost", f"hostname localhost\nload_scaling NONE\ncomplex_values gpu={GPUS}\n"
                   "user_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\n"
                   "report_variables NONE\n")
        self._load("p", "smp", "pe_name smp\nslots 9999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\n"
                   "stop_proc_args NONE\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\n"
                   "urgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n")
        queue = self.qconf("-sq").stdout  # the template
        for key, value in {"qname": "all.q", "hostlist": "localhost", "slots": str(CPUS), "pe_list": "smp",
                           "shell": "/bin/bash", "load_thresholds": "NONE", "rerun": "TRUE",
                           "notify": "00:00:30"}.items():
            queue = re.sub(rf"(?m)^{key}\s+.*$", f"{key} {value}", queue)
        self._load("q", "all.q", queue)

        self.pids.append(_start(["sge_execd"], self.SPOOL / "execd" / "localhost" / "execd.pid", self.env))
        wait_until(lambda: re.search(r"all\.q@localhost\s+BIP\s+\S+\s+\d", self.qstat("-f")) and
                   not re.search(r"all\.q@localhost.*\s(au|E|d)\s*$", self.qstat("-f"), re.M), 60, "the SGE queue")

    def qstat(self, *args: str) -> str:
        return subprocess.run(["qstat", *args], env=self.env, capture_output=True, text=True).stdout

    def submit(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """qsub ARGS: the job id. `env` is passed to the job (`-v`), which otherwise gets SGE's environment."""
        passed = ["-v", ",".join(f"{k}={v}" for k, v in env.items())] if env else []
        out = subprocess.run(["qsub", "-terse", *passed, *args], env=self.env, cwd=cwd, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"qsub {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(".")[0])

    def in_queue(self, job_id: int) -> bool:
        return bool(re.search(rf"(?m)^\s*{job_id}\s", self.qstat()))

    def job_pid(self, job_id: int) -> int | None:
        """The job script's pid (its process group) while it runs."""
        path = self.SPOOL / "execd" / "localhost" / "active_jobs" / f"{job_id}.1" / "job_pid"
        return int(path.read_text()) if path.is_file() and path.read_text().strip() else None

    def stop(self) -> None:
        subprocess.run(["qdel", "-f", "-u", "root"], env=self.env, capture_output=True)
        try:
            wait_until(lambda: not self.qstat().strip(), 90, "the jobs to end")
        except TimeoutError:
            pass
        for pid in reversed(self.pids):
            _kill(pid)


class TwoHosts:
    """Two test hosts, h1 and h2, each a network, UTS and mount namespace of this machine (tests/two_hosts.sh): its
    own hostname, address (10.235.0.1, .2 on a private bridge, no route out), /tmp and /dev/shm; the folders in
    `shared` (the repository, the tests' temporary folders) and everything outside /tmp shared, as a cluster's
    home is. Slurm (slurmctld on h1, a slurmd on each) and SGE (qmaster on h1, an execd on each, the parallel
    environment `mpi` spanning both) with their own munged, ports and cell; `stop` stops every process it started
    by its pid and removes the namespaces and links."""

    SCRIPT = Path(__file__).with_name("two_hosts.sh")
    NAMES = ("h1", "h2")

    def __init__(self, root: Path, shared: list[Path]) -> None:
        self.root = root
        self.env = {**os.environ, "SLM_HOSTS_DIR": str(root), "SLM_HOSTS_SHARED": ":".join(map(str, shared))}
        self.slurm = Slurm(root / "slurm")  # its commands reach slurmctld from this machine (addresses, no names)

    @staticmethod
    def usable() -> str | None:
        """Why two hosts cannot be made here, or None."""
        if os.geteuid() != 0:
            return "the two test hosts are network namespaces, which need root"
        missing = [p for p in ("ip", "nsenter", "unshare", "mungekey") if not shutil.which(p)]
        return f"the two test hosts need {', '.join(missing)}" if missing else None

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> None:
        up = self.script("up")
        if up.returncode != 0:
            raise RuntimeError(f"tests/two_hosts.sh up failed:\n{up.stderr[-3000:]}")
        for name, value in re.findall(r"(\w+)=(\S+)", (self.root / "env.sh").read_text()):
            self.env[name] = value.replace("$PATH", os.environ["PATH"])
        self.slurm.env.update(self.env)

    def on(self, host: str, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
        """COMMAND run on `host` (in its namespaces), from `cwd`."""
        return subprocess.run(["bash", str(self.SCRIPT), "exec", host, *command], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def qsub(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """qsub ARGS on h1 (SGE's commands need the hosts' names): the job id; `env` passed to the job (-v)."""
        passed = ["-v", ",".join(f"{k}={v}" for k, v in env.items())] if env else []
        out = self.on("h1", "qsub", "-terse", *passed, *args, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"qsub {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(".")[0])

    def sge_in_queue(self, job_id: int) -> bool:
        return bool(re.search(rf"(?m)^\s*{job_id}\s", self.on("h1", "qstat").stdout))

    def sge_job_pid(self, job_id: int) -> int | None:
        """The pid (process group) of an SGE job's script, on its first host, while it runs."""
        found = [p.read_text().strip() for p in self.root.glob(f"sge/execd/*/active_jobs/{job_id}.1/job_pid")]
        return int(found[0]) if found and found[0] else None

    def leftovers(self) -> list[str]:
        """Namespaces and links of the test hosts still there."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.split("\n")
        return [n for n in names if n.startswith("slmhost")] + [ln.split()[0] for ln in links
                                                                if ln.startswith("slmhost")]

    def stop(self) -> None:
        down = self.script("down")
        if down.returncode != 0:
            raise RuntimeError(f"tests/two_hosts.sh down failed:\n{down.stderr[-3000:]}")
        shutil.rmtree(f"{self.root}.logs", ignore_errors=True)  # the daemons' logs, kept by `down` for a person


def main() -> None:
    """`python tests/clusters.py start|stop [DIR]`: the same clusters by hand, to try the job scripts on."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("dir", nargs="?", default="/tmp/slm-clusters", help="state, logs, env.sh (default %(default)s)")
    args = parser.parse_args()
    root = Path(args.dir)
    slurm, sge = Slurm(root / "slurm"), SGE(root / "sge")
    if args.action == "stop":
        saved = json.loads((root / "pids.json").read_text())
        slurm.pids, sge.pids = saved["slurm"], saved["sge"]
        slurm.stop()
        sge.stop()
        (root / "pids.json").unlink()
        return
    reason = install_schedulers() or sge.usable()
    if reason:
        raise SystemExit(reason)
    slurm.start()
    sge.start()
    (root / "pids.json").write_text(json.dumps({"slurm": slurm.pids, "sge": sge.pids}))
    (root / "env.sh").write_text(f"export SLURM_CONF={root}/slurm/slurm.conf SGE_ROOT={SGE.ROOT} SGE_CELL=default\n")
    print(f"Slurm and SGE are up. In your shell: source {root}/env.sh; stop them: python tests/clusters.py stop {root}")


if __name__ == "__main__":
    main()

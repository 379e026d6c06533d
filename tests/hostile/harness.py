"""The hostile-input harness: every command and API call that reads a kind of input from elsewhere, run on every
hostile variant of that input (tests/hostile/variants.py), with the trust boundary's invariants checked after each
run (docs/security.md, "The hostile-input harness").

Each run happens in a fresh copy of the honest world (tests/hostile/world.py) with one variant applied, its command
run from there by the fork server (tests/hostile/zygote.py). After it:
- no payload ran (the file a pickled payload or an export's own code would create is absent);
- the outside tree is byte-equal to before, nothing new in it, none of its files read (their access times, set back
  before each run, are unchanged), and the world, the tokenizer and the corpus the shards name are as they were;
- neither the canary's content nor any secret (token variables, the Hub login's token, the netrc password) is in the
  command's stdout, its stderr, or any file it wrote or changed (the Hub double's uploads included);
- the command exited 0, or with exactly one error line and no traceback (`slm verify` may exit 1 with its report);
- a link out of a folder the command reads from elsewhere was refused (exit non-zero);
- its memory grew by at most 1.5 times what the same command's grew on the honest world (plus 64 MB for noise),
  and it ended within its time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hostile.variants import KINDS, Variant, variants
from hostile.world import MARKER, Outside, command_environment

from helpers import REPO

ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
MEMORY_FACTOR, MEMORY_SLACK = 1.5, 64 * 2**20
ERROR_LINE = re.compile(r"^(slm [\w-]+|slm/train\.py|api): error: ")


@dataclass(frozen=True)
class Command:
    """A command (or Python API call) that reads an input of `kind`, as run from a copy of the world."""

    name: str
    kind: str
    argv: tuple[str, ...]  # "slm", "train" (slm/train.py's arguments) or "open" (slm.open and what a notebook asks)
    folders: tuple[str, ...] = ()  # the folders from elsewhere it reads: a link inside one leading out must be refused
    # (a folder you name may itself be a link: you named where it leads)
    reads: tuple[str, ...] = ("*",)  # FILE:FIELD patterns of the value variants it runs on (the expensive ones)
    env: tuple[tuple[str, str], ...] = ()
    refuses: bool = False  # refuses the honest world too (what it would do is what slm never does)

    def takes(self, variant: Variant) -> bool:
        if variant.kind != self.kind:
            return False
        return not variant.field or any(fnmatch.fnmatch(f"{variant.file}:{variant.field}", p) for p in self.reads)


RUN, CKPT, EXPORT, SHARDS, HUB, TABLES = KINDS
DATA = ("--data", "shards/eval")
# Training reads of a run folder: its checkpoints, run.json's model config, metrics.jsonl, the upload queue and the
# manifest (config.yaml and run-state.json it only writes).
RESUME_READS = ("ckpt/run/run.json:config.model.*", "ckpt/run/metrics.jsonl:*", "ckpt/run/slm-manifest.json:*",
                "ckpt/run/.hub-pending/*")
COMMANDS = [
    Command("status", RUN, ("slm", "status", "ckpt/run"), ("ckpt/run",)),
    Command("plot", RUN, ("slm", "plot", "ckpt/run", "--out", "out/curves.png"), ("ckpt/run",)),
    Command("batches", RUN, ("slm", "batches", "ckpt/run", "--steps", "1:2", "--tokens", "--documents"), ("ckpt/run",)),
    Command("eval", RUN, ("slm", "eval", "ckpt/run", *DATA, "--out", "out/eval.parquet", "--max-batches", "1"),
            ("ckpt/run",)),
    Command("logprobs", RUN, ("slm", "logprobs", "ckpt/run", *DATA, "--out-dir", "out/lp", "--max-samples", "8"),
            ("ckpt/run",)),
    Command("dynamics", RUN, ("slm", "dynamics", "ckpt/run", *DATA, "--out", "out/dyn.parquet", "--max-samples", "8"),
            ("ckpt/run",)),
    Command("verify", RUN, ("slm", "verify", "ckpt/run"), ("ckpt/run",)),
    Command("slm.open", RUN, ("open", "ckpt/run"), ("ckpt/run",)),
    Command("resume, publishing", RUN, ("train", "publish.yaml", "max_duration=10ba"), ("ckpt/run",), RESUME_READS),
    Command("warm start", RUN, ("train", "tiny.yaml", "run_name=branch", "load.path=ckpt/run", "max_duration=1ba"),
            ("ckpt/run",), ()),
    Command("export", CKPT, ("slm", "export", "ckpt.pt", "--out-dir", "out/hf")),
    Command("export to the Hub", CKPT, ("slm", "export", "ckpt.pt", "--out-repo", "org/exported")),
    Command("eval", CKPT, ("slm", "eval", "ckpt.pt", *DATA, "--max-batches", "1")),
    Command("logprobs", CKPT, ("slm", "logprobs", "ckpt.pt", *DATA, "--out-dir", "out/lp", "--max-samples", "8")),
    Command("warm start", CKPT, ("train", "tiny.yaml", "run_name=branch", "load.path=ckpt.pt", "max_duration=1ba"),
            reads=("ckpt.pt:timestamp.*", "ckpt.pt:RunInfo.config.model.*")),
    Command("generate", EXPORT, ("slm", "generate", "export", "-n", "4"), ("export",)),
    Command("eval", EXPORT, ("slm", "eval", "export", *DATA, "--max-batches", "1"), ("export",)),
    Command("logprobs", EXPORT, ("slm", "logprobs", "export", *DATA, "--out-dir", "out/lp", "--max-samples", "8"),
            ("export",)),
    Command("model.pretrained", EXPORT, ("train", "pretrained.yaml"), ("export",), ("export/config.json:*",)),
    Command("eval", SHARDS, ("slm", "eval", "export", *DATA, "--max-batches", "1"), ("shards/eval",)),
    Command("logprobs", SHARDS, ("slm", "logprobs", "export", *DATA, "--out-dir", "out/lp", "--max-samples", "8"),
            ("shards/eval",)),
    Command("dynamics", SHARDS, ("slm", "dynamics", "ckpt/run", *DATA, "--out", "out/dyn.parquet", "--max-samples",
                                 "8"),
            ("shards/eval",)),
    Command("batches", SHARDS, ("slm", "batches", "shards.yaml", "--steps", "1", "--tokens", "--documents"),
            ("shards/eval",)),
    Command("batches --text", SHARDS, ("slm", "batches", "shards.yaml", "--steps", "1", "--text", "--source",
                                       "stories.jsonl"), ("shards/eval",)),
    Command("batches --text, the recorded source", SHARDS, ("slm", "batches", "shards.yaml", "--steps", "1", "--text"),
            ("shards/eval",), refuses=True),
    Command("train", SHARDS, ("train", "shards.yaml", "run_name=fresh", "max_duration=1ba"), ("shards/eval",),
            ("shards/eval/index.json:*", "shards/eval/slm-dataset.json:*")),
    Command("verify", HUB, ("slm", "verify", "org/run")),
    Command("verify --deep", HUB, ("slm", "verify", "org/run", "--deep")),
    Command("slm.open", HUB, ("open", "org/run"), env=(("SLM_CACHE", "cache"),)),
    Command("eval", HUB, ("slm", "eval", "org/run", *DATA, "--out", "out/eval.parquet", "--max-batches", "1",
                          "--checkpoints", "ba8")),
    Command("logprobs", HUB, ("slm", "logprobs", "org/run", *DATA, "--out-dir", "out/lp", "--max-samples", "8",
                              "--checkpoints", "ba8")),
    Command("warm start", HUB, ("train", "tiny.yaml", "run_name=branch", "load.path=org/run", "max_duration=1ba"),
            reads=("hub/model/org/run/main/checkpoints/*",)),
    Command("autoresume", HUB, ("train", "publish.yaml", "run_name=mirror", "max_duration=9ba"),
            reads=("hub/model/org/run/main/checkpoints/*", "hub/model/org/run/main/slm-manifest.json:*")),
    Command("dynamics", TABLES, ("slm", "dynamics", "ckpt/run", *DATA, "--out", "out/dyn.parquet", "--max-samples",
                                 "8", "--logprobs", "tables/logprobs"), ("tables/logprobs",)),
    Command("eval --out", TABLES, ("slm", "eval", "ckpt/run", *DATA, "--out", "tables/eval.parquet",
                                   "--max-batches", "1"), ("tables/eval.parquet",)),
    Command("plot --table", TABLES, ("slm", "plot", "--table", "tables/eval.parquet", "--out", "out/table.png"),
            ("tables/eval.parquet",)),
]


@dataclass
class Result:
    variant: Variant | None
    command: Command
    status: int
    violations: list[str]
    growth: int
    seconds: float
    stderr: str = ""  # its last lines


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def violations(self) -> list[Result]:
        return [r for r in self.results if r.violations]

    def counts(self) -> str:
        """The runs per input kind and command, and the violations among them, as lines."""
        runs, bad = Counter(), Counter()
        kinds: Counter = Counter()
        for r in self.results:
            key = (r.command.kind, r.command.name)
            runs[key] += 1
            bad[key] += bool(r.violations)
            kinds.update(v.split(":")[0] for v in r.violations)
        lines = [f"{kind} / {name}: {runs[kind, name]} runs, {bad[kind, name]} with violations"
                 for kind, name in sorted(runs)]
        variants_run = {(r.variant.label if r.variant else "honest") for r in self.results}
        lines.append(f"in all: {len(variants_run)} variants, {len(self.results)} runs, {len(self.violations())} with "
                     f"violations" + (f" ({', '.join(f'{k} {n}' for k, n in kinds.most_common())})" if kinds else ""))
        return "\n".join(lines)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and link under `root`: (size, mtime) by relative path."""
    found = {}
    for path in root.rglob("*"):
        if path.is_symlink() or path.is_file():
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink()
            else f"link:{os.readlink(p)}" for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


class Lane:
    """One fork server and the outside tree its runs must not reach: runs in one lane go one at a time, so whatever
    changes outside is the run's doing. Lanes run side by side, each with its own copy of the outside tree."""

    def __init__(self, root: Path, outside: Outside):
        self.root, self.outside = root, outside
        self.pristine = root / "outside.pristine"
        shutil.copytree(outside.root, self.pristine, symlinks=True)
        self.outside_hashes = _hashes(outside.root)
        env = {**command_environment(root, outside), "HOSTILE_HUB_ROOT": str(root / "unused-hub")}
        self.zygote = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=env, cwd=REPO, text=True)
        if not self.zygote.stdout.readline().strip():
            raise AssertionError(f"the harness's fork server did not start (status {self.zygote.wait()})")

    def ask(self, job: dict) -> dict:
        self.zygote.stdin.write(json.dumps(job) + "\n")
        self.zygote.stdin.flush()
        return json.loads(self.zygote.stdout.readline())

    def close(self) -> None:
        self.zygote.stdin.close()
        self.zygote.wait(timeout=60)

    def set_atimes_back(self) -> dict[str, int]:
        """Set each outside file's access time a second before its change (not the home's token file and netrc,
        which slm reads to know its secrets): a read from now on moves it (relatime)."""
        old = {}
        for path in self.outside.root.rglob("*"):
            if path.is_file() and not path.is_symlink() and self.outside.home not in path.parents:
                stat = path.stat()
                os.utime(path, ns=(stat.st_mtime_ns - 10**9, stat.st_mtime_ns))
                old[str(path)] = stat.st_mtime_ns - 10**9
        return old

    def restore(self) -> None:
        shutil.rmtree(self.outside.root)
        shutil.copytree(self.pristine, self.outside.root, symlinks=True)


class Harness:
    """Runs commands on variants in copies of the world, through `lanes` fork servers side by side; checks the
    invariants after each run."""

    def __init__(self, root: Path, world: Path, outside: Outside, watched: Iterable[Path], lanes: int = 1):
        self.root, self.world = root, world
        self.watched = {path: _tree(path) if path.is_dir() else path.stat().st_mtime_ns for path in watched}
        self.lanes = [Lane(root, outside)]
        for i in range(1, lanes):
            shutil.copytree(outside.root, root / f"lane{i}" / "outside", symlinks=True)
            self.lanes.append(Lane(root / f"lane{i}", Outside(root / f"lane{i}" / "outside")))
        self.honest: dict[tuple[str, str], Result] = {}
        self.runs = 0
        self.lock = threading.Lock()
        self.atimes_work = self._atimes_work()

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    def _atimes_work(self) -> bool:
        """Whether reading a file here updates its access time once it was set back (relatime does; noatime not)."""
        probe = self.root / "atime-probe"
        probe.write_text("x")
        os.utime(probe, ns=(10**9, 2 * 10**9))
        probe.read_text()
        return probe.stat().st_atime_ns != 10**9

    # -- one run ----------------------------------------------------------------------------------------------------
    def run(self, command: Command, variant: Variant | None = None, lane: int = 0) -> Result:
        with self.lock:
            self.runs += 1
            number = self.runs
        here, lane_ = self.root / "runs" / str(number), self.lanes[lane]
        shutil.copytree(self.world, here, symlinks=True)
        (here / "out").mkdir()
        if variant is not None:
            variant.apply(here, lane_.outside)
        before = _tree(here)
        inputs = set(_hashes(here).values())
        atimes = lane_.set_atimes_back() if self.atimes_work else {}
        honest = self.honest.get((command.kind, command.name))
        job = {"command": list(command.argv), "cwd": str(here), "hub": str(here / "hub"),
               "stdout": str(here / ".stdout"), "stderr": str(here / ".stderr"), "report": str(here / ".report"),
               "stdin": str(here / ".stdin"), "env": {k: str(here / v) for k, v in command.env},
               "memory_cap": max(3 * 2**30, 4 * (honest.growth if honest else 0)),
               "timeout": max(180, 10 * honest.seconds) if honest else 600}
        answer = lane_.ask(job)
        result = Result(variant, command, answer["status"], [], answer["growth"], answer["seconds"],
                        (here / ".stderr").read_text(errors="replace")[-1500:])
        result.violations = self.check(result, here, lane_, before, inputs, atimes, answer["killed"])
        if not result.violations:
            shutil.rmtree(here, ignore_errors=True)
        return result

    def check(self, result: Result, here: Path, lane: Lane, before: dict, inputs: set[str], atimes: dict[str, int],
              killed: str | None) -> list[str]:
        """The invariants after one run: one line for each that does not hold."""
        found = []
        stdout, stderr = (here / ".stdout").read_bytes(), (here / ".stderr").read_bytes()
        if lane.outside.marker.exists():
            found.append("payload ran: it created " + str(lane.outside.marker))
        if self.atimes_work:
            read = [p for p, t in atimes.items() if Path(p).exists() and Path(p).stat().st_atime_ns != t]
            if read:
                found.append(f"outside read: {', '.join(sorted(read)[:3])}")
        hashes = _hashes(lane.outside.root)
        if hashes != lane.outside_hashes:
            changed = sorted(k for k in hashes.keys() | lane.outside_hashes.keys()
                             if hashes.get(k) != lane.outside_hashes.get(k))
            found.append(f"outside changed: {', '.join(changed[:3])}")
            lane.restore()
        for path, was in self.watched.items():
            if (_tree(path) if path.is_dir() else path.stat().st_mtime_ns) != was:
                found.append(f"outside changed: {path}")
        written = [stdout, stderr]
        after = _tree(here)
        for name, stat in after.items():
            path = here / name
            if before.get(name) != stat and not name.startswith(".std") and not path.is_symlink():
                data = path.read_bytes()
                # A copy of an input (a download into a cache) is not slm writing what it holds; an upload is.
                if name.startswith("hub/") or hashlib.sha256(data).hexdigest() not in inputs:
                    written.append(data)
        for secret in lane.outside.secrets():
            if any(secret.encode() in data for data in written):
                found.append("secret shown or written")
                break
        if any(MARKER.encode() in data for data in written):
            found.append("canary shown or written")
        text = stderr.decode(errors="replace")
        if "Traceback (most recent call last)" in text:
            found.append("traceback: " + text.strip().splitlines()[-1][:200])
        elif killed:
            found.append({"memory": "memory: killed past its cap", "time": "hang: killed past its time"}[killed])
        elif result.status != 0:
            errors = [line for line in text.splitlines() if ERROR_LINE.match(line)]
            report = result.command.argv[:2] == ("slm", "verify") and result.status == 1 and b"fault(s)" in stdout
            if len(errors) != 1 and not report:
                found.append(f"not one error line (status {result.status}): {text.strip()[-200:]!r}")
        variant = result.variant
        if variant is not None and variant.is_link and any(
                variant.file.startswith(folder + "/") for folder in result.command.folders):
            refused = result.status != 0 and not (result.command.argv[1:2] == ("verify",) and b"fault(s)" in stdout)
            if not refused:
                found.append("link followed: the link out of the folder was not refused")
        honest = self.honest.get((result.command.kind, result.command.name))
        if honest is not None and not killed and result.growth > MEMORY_FACTOR * honest.growth + MEMORY_SLACK:
            found.append(f"memory: grew {result.growth / 2**20:.0f} MB, honest {honest.growth / 2**20:.0f} MB")
        return found

    # -- many runs --------------------------------------------------------------------------------------------------
    def baseline(self, commands: Iterable[Command]) -> list[Result]:
        """Run each command on the honest world; its memory and time are the bound for its variants."""
        results = []
        for command in commands:
            result = self.run(command)
            self.honest[command.kind, command.name] = result
            results.append(result)
        return results

    def sweep(self, pairs: list[tuple[Command, Variant]], progress: bool = False) -> Report:
        """Run every (command, variant), the lanes side by side; a line for each violation (and every 250 runs) on
        stderr with `progress`."""
        report = Report()
        queue = list(pairs)

        def work(lane: int) -> None:
            while True:
                with self.lock:
                    if not queue:
                        return
                    command, variant = queue.pop(0)
                try:
                    result = self.run(command, variant, lane)
                except Exception as e:  # noqa: BLE001 - the harness's own failure fails the sweep, named
                    result = Result(variant, command, -1, [f"harness error: {type(e).__name__}: {e}"], 0, 0.0)
                with self.lock:
                    report.results.append(result)
                    done = len(report.results)
                    if progress and (result.violations or done % 250 == 0 or done == len(pairs)):
                        print(f"[{done}/{len(pairs)}] {command.kind} / {command.name} on {variant.label}: "
                              f"{'; '.join(result.violations) or 'ok'}", file=sys.stderr, flush=True)

        threads = [threading.Thread(target=work, args=(lane,)) for lane in range(len(self.lanes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return report


def pairs(world: Path, kinds: Iterable[str] = KINDS) -> list[tuple[Command, Variant]]:
    """Every (command, variant) the full sweep runs: each variant of a kind under each command that reads it."""
    found = []
    for kind in kinds:
        for variant in variants(world, kind):
            found += [(command, variant) for command in COMMANDS if command.takes(variant)]
    return found


def sample(all_pairs: list[tuple[Command, Variant]], per_kind: int) -> list[tuple[Command, Variant]]:
    """A fixed sample of the sweep: per kind, `per_kind` pairs, the kind's commands in turn, each taking the kinds of
    mutation in turn (starting at a different one each), a pair spread evenly through its group; the training
    commands (seconds a run) at most twice a kind."""
    groups: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for command, variant in all_pairs:
        groups[variant.kind][command.name][variant.mutation].append((command, variant))
    chosen = []
    for by_command in groups.values():
        queues = []
        for offset, (_, by_mutation) in enumerate(sorted(by_command.items())):
            mutations = sorted(by_mutation)
            mutations = mutations[offset % len(mutations):] + mutations[:offset % len(mutations)]
            spread = [group[len(group) // 2::max(1, len(group) // 3)] + group[:len(group) // 2]
                      for group in (by_mutation[m] for m in mutations)]
            queues.append([pair for round_ in zip(*spread, strict=False) for pair in round_]
                          + [pair for group in spread for pair in group[min(map(len, spread)):]])
        picked, trained = [], 0
        while len(picked) < per_kind and any(queues):
            for queue in queues:
                if queue and len(picked) < per_kind:
                    command, variant = queue.pop(0)
                    if command.argv[0] == "train":
                        if trained == 2:
                            queue.clear()
                            continue
                        trained += 1
                    picked.append((command, variant))
        chosen += picked
    return chosen

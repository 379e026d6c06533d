"""Run every benchmark and write bench/RESULTS.md: each figure next to its baseline from the same run,
with the machine, the date and the commit.

  tokenizing   `slm tokenize` pipeline against the raw `tokenizers` batch encode
  parts        `slm tokenize --parts 2` against one process; each part and the merge alone
  train        slm's Trainer against a bare PyTorch loop, taking turns: the framework's ms per batch at 8 x 64
               (llama-50k, mamba-50k) and the ratio at 256 x 512 (llama-100k, llama-1m); Mamba's fast path
               against its fallback; the data loader's samples/s against what training consumes; bf16 MFU on a GPU
  loader       slm's data path against Streaming's stock reader and the raw-memmap limit, 0 and 2 workers
  resume       resume time at batch 10,000 against batch 10
  memory       peak memory of tokenizing a 4x corpus against a 1x one
  logprobs     `slm logprobs`' inner loop against a bare transformers loop
  evals        `slm eval` over a suite's checkpoints (the split read once) against a bare loop
  study        time and peak memory of `slm logprobs` and `slm dynamics` over a 40-checkpoint suite
  hub          the training thread's time queueing checkpoints for slow Hub uploads, and the loop against no Hub
  chaos        20 SIGKILLs over one run and 10 double Ctrl-Cs over another, with 2 other processes keeping the CPUs
               busy; then 8 SIGKILLs over a `composer -n 2` run (one rank killed each time)

Each runs as its own process (its output and figures go to bench/logs/NAME.log and .json); a failed one is reported
as failed and the others still run. Takes about 25 minutes on a 2-core machine; --quick runs every
benchmark small (a few minutes) to check the whole report works.

    python bench/report.py [--out bench/RESULTS.md] [--only NAME ... [--insert]] [--quick]

--insert keeps the rest of RESULTS.md and puts the rows and sections of the benchmarks run now in place of theirs
(a summary row is theirs where its first cell is one they write), saying in the header when and where they ran;
with --from-logs it runs nothing and takes an earlier run's figures from bench/logs/NAME.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import REPO, machine

CHAOS_SAVE_INTERVAL = 25  # bench/chaos.py's default: no kill may lose more batches than this
# name -> (script and arguments, the same with --quick)
BENCHES = {
    "tokenizing": (["bench/tokenizing.py"], ["bench/tokenizing.py", "--num-docs", "5000"]),
    "parts": (["bench/parts.py"], ["bench/parts.py", "--num-docs", "5000"]),
    "logprobs": (["bench/logprobs.py"], ["bench/logprobs.py", "--samples", "32", "--rounds", "1"]),
    "evals": (["bench/evals.py"], ["bench/evals.py", "--checkpoints", "2", "--samples", "32", "--rounds", "1"]),
    "study": (["bench/study.py"], ["bench/study.py", "--checkpoints", "4", "--samples", "200", "--seq-len", "128",
                                   "--chunk-samples", "50"]),
    "hub": (["bench/hub_uploads.py"], ["bench/hub_uploads.py", "--batches", "48", "--docs", "1000"]),
    "train": (["bench/train.py"], ["bench/train.py", "--quick"]),
    "loader": (["bench/loader.py"], ["bench/loader.py", "--docs", "3000"]),
    "resume": (["bench/resume.py"], ["bench/resume.py", "--far", "300", "--docs", "4000", "--repeats", "1"]),
    "memory": (["bench/memory.py"], ["bench/memory.py", "--num-docs", "5000"]),
    "chaos": (["bench/chaos.py", "--kills", "20", "--ctrl-c", "10", "--busy", "2"],
              ["bench/chaos.py", "--kills", "4", "--ctrl-c", "2", "--busy", "2", "--docs", "600"]),
    "chaos-n2": (["bench/chaos.py", "--procs", "2", "--kills", "8", "max_duration=150ba"],
                 ["bench/chaos.py", "--procs", "2", "--kills", "2", "--docs", "600", "max_duration=60ba"]),
}
PACKAGES = ["torch", "mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "datasets"]


def from_log(path: Path) -> tuple[dict, float, int]:
    """Return the figures an earlier run left in `path` (bench/logs/NAME.json), its wall time and status 0."""
    if not path.exists():
        raise SystemExit(f"no {path}: run the benchmark first")
    figures = json.loads(path.read_text())
    return figures, figures["report"]["seconds"], 0


def run_bench(name: str, command: list[str], logs: Path, measured: str) -> tuple[dict | None, float, int]:
    """Run one benchmark; its figures (None if it wrote none; with the commit, date and wall time of this run under
    "report"), its wall time and its exit status."""
    log, out = logs / f"{name}.log", logs / f"{name}.json"
    out.unlink(missing_ok=True)
    print(f"== {name}: {' '.join(command)} (log: {log.relative_to(REPO)})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, *command, "--json", str(out)], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode or not out.exists():
        tail = log.read_text().splitlines()[-15:]
        print(f"   FAILED (exit {proc.returncode}) after {seconds:.0f} s:\n" + "\n".join(tail), flush=True)
        return (json.loads(out.read_text()) if out.exists() else None), seconds, proc.returncode or 1
    print(f"   done in {seconds:.0f} s", flush=True)
    figures = json.loads(out.read_text())
    figures["report"] = {"commit": measured, "seconds": seconds,
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures, seconds, 0


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def tokenizing_rows(r: dict) -> tuple[list[str], list[str]]:
    mb, s = r["megabytes"], r["seconds"]
    ratio = s["baseline"] / s["pipeline"]
    summary = [f"| tokenizing: `load_documents` + `write_shards`, jsonl → finished MDS | {mb / s['pipeline']:.2f} MB/s "
               f"| raw `encode_batch_fast` of the text in memory: {mb / s['baseline']:.2f} MB/s | {ratio:.2f} | ≥ 0.8 "
               f"| {met(ratio >= 0.8)} |"]
    detail = [f"{r['docs']:,} generated stories ({mb:.1f} MB, {r['tokens']:,} tokens), {r['threads']} tokenizer "
              "threads on both sides.", "", "| | seconds | MB/s | vs raw encode |", "|---|---|---|---|"]
    for key, label in (("baseline", "raw `encode_batch_fast` (baseline: ids only, nothing written)"),
                       ("pipeline", "`load_documents` + `write_shards` → MDS"),
                       ("cli", "whole `slm tokenize` command, cold `datasets` cache")):
        detail.append(f"| {label} | {s[key]:.2f} | {mb / s[key]:.2f} | {s['baseline'] / s[key]:.2f} |")
    return summary, detail


# shape -> (the slm / bare goal of each model there, the framework ms-per-batch goal)
TRAIN_GOALS = {"floor": ({"llama-50k": 0.9}, 3.0), "suite": ({"llama-1m": 0.95}, None), "gpu": ({}, None)}


def parts_rows(r: dict) -> tuple[list[str], list[str]]:
    one, parts, merge = r["one"], r["in_parts"], r["merge"]
    ratio = parts["seconds"] / one["seconds"]
    peak = max(p["peak_bytes"] for p in r["each_part"]) / 2**30
    writer = merge["seconds"] / (sum(p["seconds"] for p in r["each_part"]) + merge["seconds"])
    summary = [f"| tokenizing in {r['parts']} parts side by side, then the merge, against one process | "
               f"{parts['seconds']:.1f} s | one `slm tokenize`: {one['seconds']:.1f} s | {ratio:.2f} | ≤ 1.1 "
               f"| {met(ratio <= 1.1)} |",
               f"| tokenizing in parts: peak memory of a part | {peak:.2f} GiB | one process: "
               f"{one['peak_bytes'] / 2**30:.2f} GiB | | ≤ 2.5 GiB | {met(peak <= 2.5)} |"]
    detail = [f"{r['docs']:,} generated stories ({r['megabytes']:.1f} MB, {r['tokens']:,} tokens) on {r['cpus']} "
              f"cores; every command a fresh process with a `datasets` cache of its own. The folders are "
              f"{'byte for byte equal' if r['identical'] else '**not equal**'}.", "",
              "| | seconds | tokens/s | peak of its largest process, GiB |", "|---|---|---|---|",
              f"| one `slm tokenize` process | {one['seconds']:.1f} | {r['tokens'] / one['seconds']:,.0f} | "
              f"{one['peak_bytes'] / 2**30:.2f} |",
              f"| `--parts {r['parts']}`: side by side, then the merge | {parts['seconds']:.1f} | "
              f"{r['tokens'] / parts['seconds']:,.0f} | {parts['peak_bytes'] / 2**30:.2f} |"]
    for i, part in enumerate(r["each_part"], 1):
        detail.append(f"| `--part {i}` alone | {part['seconds']:.1f} | | {part['peak_bytes'] / 2**30:.2f} |")
    detail += [f"| `--merge` alone (the writer: chunking, MDS encoding, zstd, sha1) | {merge['seconds']:.1f} | | "
               f"{merge['peak_bytes'] / 2**30:.2f} |", "",
               f"The writer's share of parts run one at a time plus the merge: {writer:.0%}."]
    return summary, detail


def logprobs_rows(r: dict) -> tuple[list[str], list[str]]:
    summary = [f"| `slm logprobs`' inner loop against a bare loop over the same model and samples, {name} | "
               f"{r['samples'] / m['slm_seconds']:,.0f} samples/s | bare: {r['samples'] / m['bare_seconds']:,.0f} "
               f"samples/s | {m['ratio']:.2f} | ≥ 0.9 | {met(m['ratio'] >= 0.9 and m['identical'])} |"
               for name, m in r["models"].items()]
    detail = [f"{r['samples']} samples of {r['seq_len']} tokens, batches of {r['batch_size']}; float32 log-softmax; "
              "each side's median over its turns. The log-probs of both sides are "
              f"{'equal' if all(m['identical'] for m in r['models'].values()) else '**not equal**'}."]
    return summary, detail


def evals_rows(r: dict) -> tuple[list[str], list[str]]:
    summary = [f"| `slm eval` over {r['checkpoints']} checkpoints ({r['model']}, the split read once) against a bare "
               f"loop loading and evaluating each | {r['checkpoints'] / r['slm_seconds']:.2f} checkpoints/s | bare: "
               f"{r['checkpoints'] / r['bare_seconds']:.2f} checkpoints/s | {r['ratio']:.2f} | ≥ 0.9 | "
               f"{met(r['ratio'] >= 0.9 and r['same_losses'])} |"]
    detail = [f"{r['samples']} samples of {r['seq_len']} tokens, batches of {r['batch_size']}; slm computes four "
              "metrics and rewrites the table after each checkpoint, the bare loop the cross-entropy alone; each "
              "side's median over its turns. The cross-entropies are "
              f"{'equal' if r['same_losses'] else '**not equal**'}."]
    return summary, detail


def hub_rows(r: dict) -> tuple[list[str], list[str]]:
    queued, latency = r["queueing_seconds"], r["latency"]
    summary = [f"| Training never waits on a Hub commit: the training thread's time queueing {r['checkpoints']} "
               f"checkpoints and their exports, against one commit ({latency:.0f} s, the Hub double) | "
               f"{queued:.2f} s | one commit: {latency:.1f} s ({r['commits']} commits: "
               f"{r['commit_seconds']:.0f} s) | {queued / latency:.2f} | < 1 | {met(queued < latency)} |",
               f"| The training loop with slow uploads against the same run without the Hub | "
               f"{r['loop_seconds']['with_uploads']:.1f} s | {r['loop_seconds']['without_hub']:.1f} s | "
               f"{r['loop_ratio']:.2f} | — | — |"]
    detail = [f"demo-llama's shape, {r['batches']} batches of 8 × 256, a checkpoint every {r['every']}; the Hub is the "
              f"folder-backed HfApi double (tests/hub_double), each commit taking {latency} s. The queueing is what "
              "the run itself reports (staging each checkpoint's hard link, weights record and HF export on the "
              "training thread); the loop's extra time over it is the upload thread's share of the interpreter. "
              f"Whole runs: {r['wall_seconds']['with_uploads']:.1f} s with uploads (the end waits for the last "
              f"ones), {r['wall_seconds']['without_hub']:.1f} s without."]
    return summary, detail


GIB = 2**10  # MiB


def study_rows(r: dict) -> tuple[list[str], list[str]]:
    losses = r["checkpoints"] * r["samples"] * (r["seq_len"] - 1)
    tokens = r["checkpoints"] * r["samples"] * r["seq_len"]
    lp, dyn, small = r["logprobs"], r["dynamics"], r["dynamics_chunked"]
    size = f"{r['checkpoints']} checkpoints × {r['samples']:,} × {r['seq_len']}"
    summary = [f"| a study of {size} ({r['model']}): `slm logprobs`, every checkpoint's table | "
               f"{tokens / lp['seconds']:,.0f} tokens/s, peak {lp['peak_anon_mib'] / GIB:.2f} GiB | | | | |",
               f"| the same study: `slm dynamics`' peak memory, default chunks (≤ 2 GiB of losses and what is computed "
               f"from them) | {dyn['peak_anon_mib'] / GIB:.2f} GiB, {losses / dyn['seconds'] / 1e6:.1f}M losses/s | "
               f"chunks of {r['chunk_samples']}: {small['peak_anon_mib'] / GIB:.2f} GiB | | ≤ 2.5 GiB | "
               f"{met(dyn['peak_anon_mib'] <= 2.5 * GIB and small['same_tables'])} |"]
    detail = [f"A real {r['model']} run saved at each of {r['checkpoints']} batches; {r['samples']:,} samples of "
              f"{r['seq_len']} tokens; each command its own process (peak anonymous memory sampled every 10 ms).", "",
              "| command | seconds | rate | peak anonymous, MiB | peak resident, MiB |", "|---|---|---|---|---|",
              f"| `slm logprobs` | {lp['seconds']:.0f} | {tokens / lp['seconds']:,.0f} tokens/s | "
              f"{lp['peak_anon_mib']:,.0f} | {lp['peak_rss_mib']:,.0f} |",
              f"| `slm dynamics --logprobs` (default chunks) | {dyn['seconds']:.0f} | {losses / dyn['seconds']:,.0f} "
              f"losses/s | {dyn['peak_anon_mib']:,.0f} | {dyn['peak_rss_mib']:,.0f} |",
              f"| `slm dynamics --logprobs --chunk-samples {r['chunk_samples']}` | {small['seconds']:.0f} | "
              f"{losses / small['seconds']:,.0f} losses/s | {small['peak_anon_mib']:,.0f} | "
              f"{small['peak_rss_mib']:,.0f} |", "",
              f"The chunked tables {'equal' if small['same_tables'] else '**differ from**'} the default's."]
    return summary, detail


def train_rows(r: dict) -> tuple[list[str], list[str]]:
    gpu = r["device"] == "cuda"
    summary, detail = [], []
    for shape in r["shapes"]:
        ratio_goals, ms_goal = TRAIN_GOALS[shape["shape"]]
        size = f"{shape['batch']} × {shape['seq_len']}"
        detail += [f"**{shape['shape']}**: {size} tokens, {shape['precision']}, on {r['gpu'] or r['device']} (torch "
                   f"{r['torch']}); {shape['chunks']} chunks of {shape['chunk']} batches per side, taking turns, "
                   f"after {shape['warmup']} warm-up; medians.", "",
                   "| model | params | bare loop ms/batch | slm ms/batch | framework ms/batch | slm / bare "
                   "| loader samples/s | training samples/s | loader / training |" + (" MFU |" if gpu else ""),
                   "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
        compiled_rows: list[str] = []
        for m in shape["models"]:
            ratio, supply = m["bare_ms"] / m["slm_ms"], m["loader_samples_s"] / m["train_samples_s"]
            goal = ratio_goals.get(m["model"], 0.9)
            if ms_goal is not None:
                summary.append(f"| training: framework cost per batch (slm − bare loop), {m['model']}, {size} "
                               f"({shape['precision']}) | {m['framework_ms']:.2f} ms ({m['slm_ms']:.2f} against "
                               f"{m['bare_ms']:.2f}) | bare loop: {m['bare_ms']:.2f} ms | | ≤ {ms_goal:g} ms "
                               f"| {met(m['framework_ms'] <= ms_goal)} |")
            summary.append(f"| training: slm's Trainer against a bare PyTorch loop, {m['model']}, {size} "
                           f"({shape['precision']}) | {m['slm_tok_s']:,.0f} tok/s | bare loop: {m['bare_tok_s']:,.0f} "
                           f"tok/s | {ratio:.2f} | ≥ {goal:g} | {met(ratio >= goal)} |")
            summary.append(f"| data loader: samples/s it delivers against what training consumes, {m['model']}, "
                           f"{size} | {m['loader_samples_s']:,.0f} samples/s | training: {m['train_samples_s']:,.1f} "
                           f"samples/s | {supply:,.0f} | ≥ 10 | {met(supply >= 10)} |")
            if m["mfu"] is not None:
                mfu_goal = 0.4 if m["model"] == "llama-25m" else None
                summary.append(f"| GPU: MFU of slm's Trainer, {m['model']} (bf16) | {m['mfu']:.1%} "
                               f"({m['slm_tok_s']:,.0f} tok/s) | the GPU's bf16 peak | | "
                               + (f"≥ 40% | {met(m['mfu'] >= mfu_goal)} |" if mfu_goal else "| |"))
            detail.append(f"| {m['model']} | {m['params']:,} | {m['bare_ms']:.2f} | {m['slm_ms']:.2f} | "
                          f"{m['framework_ms']:+.2f} | {ratio:.3f} | {m['loader_samples_s']:,.0f} | "
                          f"{m['train_samples_s']:,.1f} | {supply:,.0f} |" + (f" {m['mfu']:.1%} |" if gpu else ""))
            compiled = m.get("compiled")
            if compiled:
                eager_gain, of_bare = m["bare_ms"] / compiled["slm_ms"], compiled["bare_ms"] / compiled["slm_ms"]
                summary += [f"| training, `compile: true`: slm compiled against the bare eager loop, {m['model']}, "
                            f"{size} | {compiled['slm_ms']:.2f} ms/batch | bare eager: {m['bare_ms']:.2f} ms/batch "
                            f"| {eager_gain:.2f} | ≥ 1.15 | {met(eager_gain >= 1.15)} |",
                            f"| training, `compile: true`: slm compiled against the bare loop compiled, {m['model']}, "
                            f"{size} | {compiled['slm_ms']:.2f} ms/batch | bare compiled: {compiled['bare_ms']:.2f} "
                            f"ms/batch | {of_bare:.2f} | ≥ 0.9 | {met(of_bare >= 0.9)} |"]
                compiled_rows.append(f"| {m['model']} | {m['bare_ms']:.2f} | {compiled['bare_ms']:.2f} | "
                                     f"{compiled['slm_ms']:.2f} | {m['bare_ms'] / compiled['bare_ms']:.2f} | "
                                     f"{eager_gain:.2f} | {of_bare:.2f} |")
            paths = m.get("mamba_paths")
            if paths and "skipped" in paths:
                summary.append(f"| Mamba: {paths['fast']} kernels against {paths['slow']}, {m['model']} | not "
                               f"measured: {paths['skipped']} | | | | |")
            elif paths:
                summary.append(f"| Mamba: {paths['fast']} against {paths['slow']}, {m['model']}, batch "
                               f"{paths['batch']} × {shape['seq_len']} | {paths['fast_tok_s']:,.0f} tok/s "
                               f"| {paths['slow']}: {paths['slow_tok_s']:,.0f} tok/s "
                               f"| {paths['fast_tok_s'] / paths['slow_tok_s']:.1f}× | | |")
        detail.append("")
        if compiled_rows:
            detail += ["`compile: true` against the bare loop, both compiled with `torch.compile` (the first batch's "
                       "compile is in the warm-up):", "", "| model | bare eager ms/batch | bare compiled ms/batch | "
                       "slm compiled ms/batch | bare compiled / bare eager | slm compiled / bare eager | slm / bare, "
                       "both compiled |", "|---|---|---|---|---|---|---|", *compiled_rows, ""]
        if "dispatch_us" in shape:
            d = shape["dispatch_us"]
            summary.append(f"| training: Composer's event dispatch, one event no callback answers (a batch has 13) "
                           f"| slm's: {d['slm']:.1f} µs | Composer's own: {d['composer']:.1f} µs "
                           f"| {d['composer'] / d['slm']:.1f}× less | | |")
        if "host_syncs" in shape:
            h = shape["host_syncs"]
            summary.append(f"| training: host syncs in a batch that logs nothing, {shape['models'][0]['model']} "
                           f"(`.item()`, `.cpu()`, `bool(tensor)`, ...) | slm: {h['slm']:g} | Composer: "
                           f"{h['composer']:g} | | slm: 0 | {met(h['slm'] == 0)} |")
            detail += ["Composer's own host syncs in each training batch that logs nothing (one process, with slm's "
                       "workarounds; counted by `bench/syncs.py`):", "", "| call, where | per batch |",
                       "|---|---|", *(f"| `{call}` | {n:g} |" for call, n in h["composer_calls"].items()), ""]
        if "together" in shape:
            t = shape["together"]
            gain = t["one_after_the_other_s"] / t["together_s"]
            summary.append(f"| suites: two {t['model']} runs of {t['batches']} batches side by side "
                           f"(`--per-device 2`, the cores split), start-up included | {t['together_s']:.1f} s "
                           f"| one after the other, every core each: {t['one_after_the_other_s']:.1f} s "
                           f"| {gain:.2f} | ≥ 1.6 | {met(gain >= 1.6)} |")
    if not gpu:
        summary.append("| GPU: llama-100k, llama-1m, llama-25m and mamba-25m at 256 × 512 in bf16, slm / bare and MFU; "
                       "mamba-ssm kernels against mambapy | not measured: no GPU on this machine (`python "
                       "bench/train.py` measures them on one) | | | | |")
    return summary, detail


def loader_rows(r: dict) -> tuple[list[str], list[str]]:
    rate, workers = r["samples_per_s"], r["workers"]
    ratio = rate["slm/0"] / rate["stock/0"]
    summary = [f"| data path: slm's loader (`MappedShards`) against Streaming's stock reader, one process, "
               f"{r['seq_len']}-token samples | {rate['slm/0']:,.0f} samples/s | stock: {rate['stock/0']:,.0f} "
               f"samples/s | {ratio:.1f}× | ≥ 20× | {met(ratio >= 20)} |",
               f"| data path: slm's loader against the raw-memmap limit (rows of the mapped shards, stacked) "
               f"| {rate['slm/0']:,.0f} samples/s | raw memmap: {rate['raw/0']:,.0f} samples/s "
               f"| {rate['slm/0'] / rate['raw/0']:.2f} | | |"]
    detail = [f"{r['samples']:,} samples of {r['seq_len']} tokens ({r['docs']:,} generated stories, `slm tokenize`), "
              f"batch {r['batch']}, one shuffled epoch per figure after an untimed one; the same order for slm and "
              "raw memmap.", "", "| reader | workers | samples/s | vs stock, 0 workers |", "|---|---|---|---|"]
    names = {"stock": "Streaming's `StreamingDataset`", "slm": "slm's `MappedShards`",
             "raw": "raw memmap (the limit: no Streaming, no decoding, no DataLoader)"}
    for key, value in rate.items():
        reader, count = key.split("/")
        detail.append(f"| {names[reader]} | {count} | {value:,.0f} | {value / rate['stock/0']:.1f}× |")
    detail += ["", f"With {workers} worker processes both readers are slower on this 2-core machine: handing each "
               "batch over from a worker costs more than reading it; hence `data.num_workers: 0` by default."]
    return summary, detail


def resume_rows(r: dict) -> tuple[list[str], list[str]]:
    ratio = r["far_s"] / r["near_s"]
    summary = [f"| resume: Trainer built on the checkpoint + one batch, at batch {r['far']:,} | {r['far_s']:.2f} s "
               f"| at batch {r['near']}: {r['near_s']:.2f} s | {ratio:.2f} | ≤ 1.2 | {met(ratio <= 1.2)} |"]
    detail = [f"demo-llama at batch size 1 on {r['samples']:,} training samples, so batch {r['far']:,} is inside the "
              f"first epoch. Each resume on a fresh copy of the run folder; medians. Replaying the {r['far']:,} "
              f"batches instead (a loader that cannot restore its position) would add {r['replay_s']:.1f} s.", "",
              "| resume at | each try, s | median, s |", "|---|---|---|"]
    for at, tries in r["seconds"].items():
        each = ", ".join(f"{t:.3f}" for t in tries)
        detail.append(f"| batch {int(at):,} | {each} | {statistics.median(tries):.3f} |")
    return summary, detail


def memory_rows(r: dict) -> tuple[list[str], list[str]]:
    peaks, sizes = r["peak_mib"], r["corpus_mib"]
    summary = []
    for cache, what, goal in (("warm", "Arrow cached: our streaming encode → chunk → write", 1.1),
                              ("cold", "first run, including `datasets`' jsonl → Arrow conversion", 1.2)):
        ratio = peaks[f"4x {cache}"][0] / peaks[f"1x {cache}"][0]
        summary.append(f"| memory: anonymous peak of `slm tokenize` on a 4× corpus ({sizes['4']:.0f} MiB), {what} "
                       f"| {peaks[f'4x {cache}'][0]:.0f} MiB | on the 1× corpus ({sizes['1']:.0f} MiB): "
                       f"{peaks[f'1x {cache}'][0]:.0f} MiB | {ratio:.2f} | ≤ {goal} | {met(ratio <= goal)} |")
    detail = ["Anonymous memory is what the machine must find; the resident peak also counts pages of the "
              "memory-mapped Arrow file read so far (page cache, given back under pressure). Cold: the first run "
              "on a file, which has `datasets` convert the jsonl to Arrow; warm: the same command again.", "",
              "| | anonymous peak, MiB | resident peak (ru_maxrss), MiB |", "|---|---|---|",
              f"| imports only (baseline) | {r['imports_mib'][0]:.0f} | {r['imports_mib'][1]:.0f} |"]
    for key, (anon, resident) in peaks.items():
        scale, cache = key.split()
        detail.append(f"| `slm tokenize`, {scale} corpus: {r['docs'] * int(scale[0]):,} stories, "
                      f"{sizes[scale[0]]:.0f} MiB, {cache} cache | {anon:.0f} | {resident:.0f} |")
    return summary, detail


def chaos_rows(r: dict) -> tuple[list[str], list[str]]:
    lost = [k["lost"] for k in r["records"]]
    who = "`composer -n 2`, one rank killed each time" if r["procs"] == 2 else "one process"
    if r.get("busy"):
        who += f", {r['busy']} other processes keeping the CPUs busy"
    worst = max(lost, default=0)
    ok = r["survived"] and not r["corrupt"] and r["bitwise_equal"] and not r["left_running"] and \
        worst <= CHAOS_SAVE_INTERVAL
    summary = [f"| chaos: {r['kills']} SIGKILLs, {who}: corrupt checkpoints / processes left / batches lost per kill "
               f"(max) / final weights equal to an uninterrupted run | {len(r['corrupt'])} / {len(r['left_running'])} "
               f"/ {worst} / {'equal' if r['bitwise_equal'] else 'DIFFERENT'} | the uninterrupted run "
               f"| | 0 / 0 / ≤ {CHAOS_SAVE_INTERVAL} / equal | {met(ok)} |"]
    detail = ["| kill | moment | newest complete checkpoint at start | resumed at | batch reached | batches lost "
              "| stale shm blocks left |", "|---|---|---|---|---|---|---|"]
    for k in r["records"]:
        detail.append(f"| {k['kill']} | {k['moment']} | {k['complete_before']} | "
                      f"{'-' if k['resumed_at'] is None else k['resumed_at']} | {k['reached']} | {k['lost']} | "
                      f"{k['stale_shm']} |")
    detail += ["", f"The final start resumed at batch {r['final_resumed_at']} and exited {r['final_exit']}; every "
               f"start resumed from the newest complete checkpoint: {'yes' if r['survived'] else 'no'}. "
               "(- : killed before it said where it resumed.)"]
    if r.get("ctrl_c"):
        more_summary, more_detail = ctrl_c_rows(r["ctrl_c"], who)
        summary += more_summary
        detail += more_detail
    return summary, detail


def ctrl_c_rows(c: dict, who: str) -> tuple[list[str], list[str]]:
    """The double-Ctrl-C rounds of bench/chaos.py --ctrl-c."""
    records = c["records"]
    torn = sum(len(k["torn"]) for k in records)
    exits = sorted({k["exit"] for k in records}, key=str)
    ok = c["bitwise_equal"] and not torn and set(exits) <= {0, 130} and not any(k["left_running"] for k in records) \
        and all(k["resumed_at"] in (None, k["complete_before"]) for k in records)
    summary = [f"| chaos: {c['rounds']} double Ctrl-Cs, {who}: torn checkpoints / exit statuses / final weights "
               f"equal to an uninterrupted run | {torn} / {', '.join(map(str, exits))} / "
               f"{'equal' if c['bitwise_equal'] else 'DIFFERENT'} | the uninterrupted run | | 0 / 130 / equal "
               f"| {met(ok)} |"]
    detail = ["", "Ctrl-C twice (SIGINT to the run's process group, as a terminal sends it), the first at a random "
              "moment 1 to 8 batches into training:", "",
              "| round | second Ctrl-C | newest complete checkpoint at start | resumed at "
              "| exit | batch reached | newest complete checkpoint after | torn checkpoints |",
              "|---|---|---|---|---|---|---|---|"]
    for k in records:
        detail.append(f"| {k['round']} | {k['second']} | {k['complete_before']} | "
                      f"{'-' if k['resumed_at'] is None else k['resumed_at']} | {k['exit']} | {k['reached']} | "
                      f"{k['newest_complete']} | {len(k['torn'])} |")
    detail += ["", f"The final start resumed at batch {c['final_resumed_at']} and exited {c['final_exit']}."]
    return summary, detail


ROWS = {"tokenizing": tokenizing_rows, "parts": parts_rows, "logprobs": logprobs_rows, "evals": evals_rows,
        "study": study_rows, "hub": hub_rows, "train": train_rows,
        "loader": loader_rows,
        "resume": resume_rows,
        "memory": memory_rows, "chaos": chaos_rows, "chaos-n2": chaos_rows}
TITLES = {"tokenizing": "Tokenizing", "parts": "Tokenizing in parts", "logprobs": "Log-probs",
          "evals": "Evaluating a suite", "study": "A study's size", "hub": "Hub uploads beside training",
          "train": "Training", "loader": "Data path",
          "resume": "Resume time",
          "memory": "Tokenizer memory",
          "chaos": "Chaos resume, one process", "chaos-n2": "Chaos resume, `composer -n 2`"}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench/RESULTS.md", ":!bench/logs"],
                             cwd=REPO, capture_output=True, text=True)
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if changed.stdout.strip() else "")


def inserted(report: str, where: str, rows: list[str], sections: dict[str, list[str]]) -> str:
    """Return RESULTS.md `report` with `rows` in its summary table (replacing rows of the same first cell, else at
    its end), each of `sections` in place of the section of its title (else at the end), and `where` said after the
    header's paragraphs."""
    def first_cell(row: str) -> str:
        return row.split(" | ")[0]

    lines = report.rstrip("\n").split("\n")
    said = where.split(" are from ")[0]
    lines = [line for line in lines if not line.startswith(said)]  # the note of an earlier insert of these rows
    while "## Summary" in lines and lines[lines.index("## Summary") - 2:lines.index("## Summary")] == ["", ""]:
        lines.pop(lines.index("## Summary") - 1)
    summary = lines.index("## Summary")
    lines[summary:summary] = [where, ""]
    table_end = next(i for i in range(lines.index("|---|---|---|---|---|---|") + 1, len(lines) + 1)
                     if i == len(lines) or not lines[i].startswith("|"))
    new = {first_cell(row) for row in rows}
    kept = [row for row in lines[lines.index("|---|---|---|---|---|---|") + 1:table_end] if first_cell(row) not in new]
    lines[lines.index("|---|---|---|---|---|---|") + 1:table_end] = kept + rows
    for title, body in sections.items():
        heading = f"## {title}"
        if heading in lines:
            start = lines.index(heading)
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            lines[start:end] = [heading, "", *body, ""]
        else:
            lines += ["", heading, "", *body]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--quick", action="store_true", help="every benchmark small: checks the report, "
                        "not the figures")
    parser.add_argument("--insert", action="store_true", help="with --only: update RESULTS.md in place, keeping "
                        "the other benchmarks' rows")
    parser.add_argument("--from-logs", action="store_true", help="with --insert: run nothing, take the figures of "
                        "an earlier run from bench/logs/NAME.json (its commit, date and minutes are in it)")
    args = parser.parse_args()
    if args.insert and not args.only:
        parser.error("--insert updates the rows of the benchmarks --only names")
    if args.from_logs and not args.insert:
        parser.error("--from-logs goes with --insert")
    logs = REPO / "bench" / "logs"
    logs.mkdir(exist_ok=True)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    measured = commit()  # before the benchmarks: files edited while they run are not what they measured
    if args.from_logs:
        results = {name: from_log(logs / f"{name}.json") for name in args.only}
        measured = "/".join(sorted({figures["report"]["commit"] for figures, _, _ in results.values()}))
        started = datetime.datetime.fromisoformat(min(f["report"]["date"] for f, _, _ in results.values()))
    else:
        results = {name: run_bench(name, BENCHES[name][args.quick], logs, measured)
                   for name in args.only or BENCHES}
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)
    lines = ["# Benchmark results", "",
             f"Written by `python bench/report.py{' --quick' if args.quick else ''}` on "
             f"{started:%Y-%m-%d %H:%M} UTC in {(time.perf_counter() - start) / 60:.0f} min, at commit {measured}.",
             "", f"- Machine: {machine()}", f"- Python {platform.python_version()}; {versions}", "",
             "Every ratio is against a baseline measured in the same run on this machine. Rerun: "
             "`python bench/report.py` (about 25 minutes on 2 cores); each benchmark's own output and figures are in "
             "`bench/logs/`.", "", "## Summary", "", "| claim | figure | baseline | ratio | goal | met |",
             "|---|---|---|---|---|---|"]
    rows, sections = [], {}
    for name, (figures, seconds, _) in results.items():
        if figures is None:
            rows.append(f"| {TITLES[name]} | **failed**: see `bench/logs/{name}.log` | | | | **no** |")
            continue
        summary, detail = ROWS[name](figures)
        rows += summary
        command = " ".join(BENCHES[name][args.quick])
        sections[TITLES[name]] = [f"`python {command}`, {seconds / 60:.1f} min.", "", *detail]
    if args.insert:
        where = (f"The rows of {', '.join(TITLES[n] for n in results)} are from `python bench/report.py --only "
                 f"{' '.join(results)} --insert` alone, on {started:%Y-%m-%d} at commit {measured}, on "
                 f"{results[next(iter(results))][0].get('machine', machine())}.")
        args.out.write_text(inserted(args.out.read_text(), where, rows, sections))
    else:
        details = [line for title, body in sections.items() for line in ["", f"## {title}", "", *body]]
        args.out.write_text("\n".join(lines + rows + details) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(status for _, _, status in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

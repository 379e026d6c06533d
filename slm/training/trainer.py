"""The Trainer of a run, assembled: after the checks of slm/training/preflight.py, the callbacks in their order,
Composer's Trainer (autoresumed), and the run's start and end recorded (`train_command`, which slm/train.py runs).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import CheckpointSaver, LRMonitor, SpeedMonitor
from composer.core import Callback, Evaluator, Time
from composer.loggers import LoggerDestination
from composer.profiler import JSONTraceHandler, Profiler, cyclic_schedule
from composer.utils import dist

from slm.core import composer_workarounds, streaming_workarounds
from slm.core.config import OptimizerConfig, ProfileConfig, TrainConfig, load_config, save_config
from slm.core.errors import LOG, SlmError, describe_error, disk_error, progress_shown, run_command, say
from slm.core.run_folder import FILENAME, LATEST_FILENAME, METRICS
from slm.data.loading import build_dataloader
from slm.hub.client import CommitBudget, Hub
from slm.hub.manifest import remote_name
from slm.training.checkpointing import KeepNewestPeriodic, early_batches, save_schedule, token_batches
from slm.training.hub_checkpoints import HubCheckpoints
from slm.training.loggers import MetricsFile, WriteMetricsRow, wandb_run_id
from slm.training.metrics import TrainMetrics
from slm.training.model import CompileTime, count_parameters
from slm.training.preemption import SIGNALS, StopOnSignal
from slm.training.preflight import Plan, preflight, prepare_run_folder
from slm.training.run_info import RunInfo, record_state
from slm.training.schedules import Schedule
from slm.training.warm_start import IGNORE_KEYS, check_fits, warm_start_checkpoint, warm_start_record


@dataclass
class RunCallbacks:
    """A run's Composer callbacks and loggers, in the order Composer calls them, and the ones the run reaches again."""

    callbacks: list[Callback]
    loggers: list[LoggerDestination]
    schedule: Schedule  # also the Trainer's scheduler; refuses an idle continuation once autoresume has loaded
    stop: StopOnSignal  # how training ended: finished, or stopped by a signal or Ctrl-C
    hub: HubCheckpoints | None  # drains its upload queue before the run exits
    interactive: bool  # a progress bar on a terminal instead of Composer's console log


@dataclass
class ReadyRun:
    """A run ready to train: its Trainer and the callbacks the run reaches again after making it."""

    trainer: Trainer
    callbacks: RunCallbacks


def build_callbacks(cfg: TrainConfig, run_info: RunInfo, metrics: MetricsFile, train_metrics: TrainMetrics,
                    seq_len: int) -> RunCallbacks:
    """Make a run's callbacks and loggers, in the order Composer must call them.

    Composer runs the callbacks in list order at every event, before the loggers (except at
    INIT). So, at each BATCH_CHECKPOINT:
    - SpeedMonitor, LRMonitor, TrainMetrics, RunInfo: log and record first (TrainMetrics logs its window
      at BATCH_END); the state of the last two rides in every checkpoint, as does the Schedule's (the lr
      schedule, also handed to the Trainer as its scheduler: it answers no event).
    - WriteMetricsRow: the batch's metrics.jsonl row goes to disk before the saver runs, so no
      checkpoint ever holds a batch missing from metrics.jsonl.
    - StopOnSignal: a scheduler's signal ends training at this batch, where the saver, next, sees it.
    - CheckpointSaver: writes the checkpoint and hands it to every logger's upload_file (the Hub's queues it,
      with its export, in the run folder's .hub-pending/; a thread uploads it).
    - KeepNewestPeriodic: prunes last, once the newest checkpoint is written and queued.
    - CompileTime, with `compile: true`: says once how long the first batch's compile took.
    The loggers: metrics.jsonl, then the Hub and W&B, then the terminal's progress bar.
    """
    folder = cfg.folder
    early = early_batches(cfg.early_checkpoints) | token_batches(cfg.checkpoints_per_token_decade,
                                                                 cfg.global_batch_size * seq_len)
    saver = CheckpointSaver(folder=str(folder), filename=FILENAME, latest_filename=LATEST_FILENAME,
                            save_interval=save_schedule(cfg.save_interval, early), overwrite=True,
                            remote_file_name=remote_name(FILENAME),
                            latest_remote_file_name=remote_name(LATEST_FILENAME))
    schedule, stop = Schedule(cfg.scheduler), StopOnSignal()
    callbacks = [SpeedMonitor(window_size=10), LRMonitor(), schedule, train_metrics, run_info,
                WriteMetricsRow(metrics), stop, saver, KeepNewestPeriodic(folder, cfg.keep, early),
                *([CompileTime()] if cfg.compile else [])]

    loggers: list[LoggerDestination] = [metrics]
    hub = None
    if cfg.hub.repo:
        hub = HubCheckpoints(Hub(cfg.hub.retries, cfg.hub.retry_wait,
                                 budget=CommitBudget(cfg.hub.max_commits_per_hour, cfg.hub.budget_window_s)),
                             cfg.hub.repo, folder, cfg.hub.private, cfg.hub.export, cfg.run_name)
        loggers.append(hub)
    w = cfg.logging.wandb
    if w.project:
        loggers.append(composer_workarounds.WandB(
            project=w.project, entity=w.entity, group=w.group, tags=w.tags or None,
            init_kwargs={"id": wandb_run_id(cfg.run_name), "resume": "allow", "dir": str(folder),
                         "config": cfg.to_dict()}))
    interactive = sys.stderr.isatty() and progress_shown()
    if interactive:
        loggers.append(composer_workarounds.ResumableProgressBar())
    return RunCallbacks(callbacks, loggers, schedule, stop, hub, interactive)


def _optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Build AdamW; weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None)


def make_trainer(plan: Plan, warm_start: Path | None = None) -> ReadyRun:
    """Make Composer's Trainer over a checked plan, its run folder prepared (no checks of its own): it autoresumes
    from the run folder (or the Hub), and a new run starts from `warm_start` (a checkpoint file) when given."""
    cfg, model, folder = plan.cfg, plan.model, plan.cfg.folder
    metrics = MetricsFile(folder / METRICS)
    run_info = RunInfo(cfg, plan.tokenizer_identity, count_parameters(model.model), metrics,
                       warm_start_record(cfg.load, warm_start) if warm_start else None)
    train_metrics = TrainMetrics(model, plan.train_metrics, cfg.log_interval)
    callbacks = build_callbacks(cfg, run_info, metrics, train_metrics, plan.seq_len)
    train_data = build_dataloader(cfg.data.train, cfg.data, plan.per_device_batch, train=True)
    eval_data = build_dataloader(cfg.data.eval, cfg.data, plan.per_device_batch, train=False)
    trainer = Trainer(
        model=model,
        run_name=cfg.run_name,
        seed=cfg.seed,
        device="gpu" if plan.gpu else "cpu",
        precision=cfg.precision or ("amp_bf16" if plan.gpu else "fp32"),
        max_duration=Time.from_timestring(cfg.max_duration),
        train_dataloader=train_data,
        eval_dataloader=Evaluator(label="eval", dataloader=eval_data, metric_names=list(model.val_metrics)),
        eval_interval=Time.from_timestring(cfg.eval_interval),
        eval_subset_num_batches=cfg.eval_batches,
        device_train_microbatch_size=cfg.device_microbatch_size or plan.per_device_batch,
        optimizers=_optimizer(model.model, cfg.optimizer),
        schedulers=callbacks.schedule,
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=cfg.grad_clip)] if cfg.grad_clip else [],
        callbacks=callbacks.callbacks,
        loggers=callbacks.loggers,
        save_folder=str(folder),
        autoresume=True,
        load_path=str(warm_start) if warm_start else None,
        load_weights_only=cfg.load.weights_only,
        load_ignore_keys=None if cfg.load.weights_only else IGNORE_KEYS,
        spin_dataloaders=False,  # Streaming restores its own position
        progress_bar=False,  # the ResumableProgressBar logger instead, when interactive
        log_to_console=not callbacks.interactive and progress_shown(),
        console_log_interval=Time.from_timestring(cfg.log_interval),
        deterministic_mode=cfg.deterministic or not plan.gpu,
        compile_config={} if cfg.compile else None,
        python_log_level=logging.getLevelName(LOG.getEffectiveLevel() if dist.get_global_rank() == 0 else
                                              max(LOG.getEffectiveLevel(), logging.ERROR)),
        dist_timeout=cfg.dist_timeout,
        profiler=_profiler(cfg.profile, folder) if cfg.profile.batches else None,
    )
    return ReadyRun(trainer, callbacks)


def _profiler(profile: ProfileConfig, folder: Path) -> Profiler:
    """Return Composer's profiler for the `profile:` key: after `skip_first` batches and one unrecorded, a trace of
    `batches` batches in the run folder's profile/ (Chrome/Perfetto JSON: each Trainer event, the data loader's
    waits, the CPU), with `torch`, PyTorch's operator trace in profile/torch/ too; nothing is uploaded."""
    return Profiler(
        schedule=cyclic_schedule(skip_first=profile.skip_first, wait=0, warmup=1, active=profile.batches, repeat=1),
        trace_handlers=[JSONTraceHandler(folder=str(folder / "profile"), remote_file_name=None,
                                         merged_trace_remote_file_name=None, overwrite=True)],
        torch_prof_folder=str(folder / "profile" / "torch"), torch_prof_remote_file_name=None,
        torch_prof_memory_remote_file_name=None, torch_prof_overwrite=True, torch_prof_profile_memory=profile.torch,
        torch_prof_with_flops=profile.torch)


def start_run(cfg: TrainConfig) -> ReadyRun:
    """Check everything and make the run ready to fit: preflight, then the run folder, the warm start and the
    Trainer (autoresumed), then the schedule's refusal of an idle continuation; config.yaml is written only once
    the start is accepted."""
    plan = preflight(cfg)
    folder = cfg.folder
    own = prepare_run_folder(cfg, plan.model.model)
    warm_start = warm_start_checkpoint(cfg.load, folder, resumes=own is not None)
    if warm_start:
        check_fits(warm_start, plan.model.model, "load.path must be a checkpoint of a model with this model config")
    run = make_trainer(plan, warm_start)
    run.callbacks.schedule.refuse_idle_continuation(run.trainer.state, str(folder))  # the ends it committed to
    if dist.get_global_rank() == 0:
        save_config(cfg, folder / "config.yaml")  # only now: a refused start leaves the folder as it was
    return run


def train(cfg: TrainConfig) -> int:
    """Start or resume the run and train it to max_duration; return the exit status (EXIT_PREEMPTED: stopped by a
    signal, EXIT_INTERRUPTED: by Ctrl-C)."""
    run = start_run(cfg)
    trainer, stop = run.trainer, run.callbacks.stop
    finished = trainer.state.get_elapsed_duration() >= 1
    batch = int(trainer.state.timestamp.batch)
    # What Composer loaded: the run's own latest (autoresume, from the folder or downloaded into it from the Hub),
    # else a warm start's checkpoint, never directly in the run folder (slm/training/warm_start.py). Compared as real
    # paths: Composer's is absolute, save_folder may be relative or reached through a symlink.
    loaded = trainer.state.load_path
    branched = (f", branched off {loaded} ({'its weights' if cfg.load.weights_only else 'its whole state'})"
                if loaded and Path(loaded).resolve().parent != cfg.folder.resolve() else "")
    started = "resumed" if loaded and not branched else "starting"
    say(f"{cfg.run_name}: {started} at batch {batch} of {cfg.max_duration}{branched}"
        + ("; already finished (a larger max_duration continues it)" if finished else ""))
    record_state(cfg.folder, "running", batch=batch)
    try:
        if not finished:  # a resubmitted or requeued job whose run is done has nothing to do, and is no error
            trainer.fit()
        if run.callbacks.hub:
            run.callbacks.hub.finish(trainer.state)  # the upload queue drains (an earlier start's too) before exit
        trainer.close()
    except KeyboardInterrupt:
        record_state(cfg.folder, "stopped", detail="a second Ctrl-C stopped it at once")
        raise
    except Exception as e:
        record_state(cfg.folder, "failed", detail=describe_error(e))
        raise
    batch = int(trainer.state.timestamp.batch)
    if stop.stopped_at is None:
        record_state(cfg.folder, "finished", batch=batch, detail=f"at batch {batch}")
        return 0
    record_state(cfg.folder, "stopped", batch=batch, detail=f"at batch {stop.stopped_at} on {stop.received}",
                 exit_status=stop.exit_status)
    say(f"{cfg.run_name}: stopped at batch {stop.stopped_at} on {stop.received}, checkpoint saved; the same command "
        "resumes it")
    return stop.exit_status  # 75 (requeued by jobs/*), or 130 after a Ctrl-C


@contextmanager
def same_numerics_in_any_process() -> Iterator[None]:
    """Set the process-wide settings a run's arithmetic depends on the same way whatever the process did before
    (a notebook or a test session runs many things before a run): the CPU thread
    count set explicitly (which turns off MKL's dynamic threading: docs/design.md, "Training"; it stays so) and
    float32 as the default dtype (the caller's is put back afterwards)."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def train_command(configs: list[str], overrides: list[str], debug: bool = False, owns_process: bool = False) -> int:
    """Run `slm/train.py CONFIGS... OVERRIDES...` (slm/train.py parses them) and return its exit status: any error
    one line (`slm train: error: ...`), a full disk naming the run folder."""

    def run() -> int:
        cfg = load_config(configs, overrides)
        try:
            with composer_workarounds.applied(), streaming_workarounds.applied(), same_numerics_in_any_process():
                return train(cfg)
        except Exception as e:  # a full disk: name the run folder when the error does not name a file
            problem = disk_error(e, where=str(cfg.folder))
            if problem:
                raise SlmError(problem) from e
            raise

    previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *SIGNALS)}
    try:
        return run_command("slm train", run, debug)
    finally:
        # Called from Python (a notebook, tests), the process goes on: its Ctrl-C and the schedulers' signals
        # are its own again. Owning the process (the script, `slm train`), the run ignores those signals until exit
        # (slm/training/preemption.py), Ctrl-C too once its status is settled: Python resets a signal it handles to
        # the default (death) while the interpreter shuts down, and a second Ctrl-C then killed the process (status
        # -2, not 130).
        if not owns_process and threading.current_thread() is threading.main_thread():
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        elif owns_process:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


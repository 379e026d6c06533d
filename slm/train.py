"""Train one model with Composer's Trainer.

    python slm/train.py CONFIG.yaml [key=value ...]
    composer -n N slm/train.py CONFIG.yaml [key=value ...]

Both run this same code. Running again with the same run_name resumes from the newest
complete checkpoint in checkpoints/RUN_NAME/ (model, optimizer, scheduler, RNG and the exact
position in the Streaming data order); a larger max_duration continues a finished run.
SIGTERM, SIGUSR1 or SIGUSR2 (a scheduler's warning) stops it at the end of the current batch
with a checkpoint and exit status 75, ready to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import CheckpointSaver, LRMonitor, SpeedMonitor
from composer.core import Evaluator, Time
from composer.optim import CosineAnnealingWithWarmupScheduler
from composer.utils import dist
from omegaconf import DictConfig, OmegaConf

from slm.checkpoints import KeepNewestPeriodic, early_batches, repair_latest, save_schedule
from slm.config import load_config, save_config
from slm.data import build_dataloader, check_compatible, split_metadata
from slm.errors import SlmError, disk_error
from slm.hub import Hub
from slm.hub_store import REMOTE_FOLDER, ExportToHub, HubCheckpoints
from slm.loggers import MetricsFile, ResumableProgressBar, WandB, WriteMetricsRow, check_wandb_login, wandb_run_id
from slm.metrics import build_metrics, byte_lengths
from slm.model import CausalLM, build_hf_model, count_parameters
from slm.preemption import EXIT_PREEMPTED, StopOnSignal
from slm.runinfo import RunInfo
from slm.shm import clean_stale_shared_memory
from slm.tokenizer import load_tokenizer, tokenizer_identity

# Composer's warnings about passing a ProgressBarLogger ourselves and about it not being in old checkpoints.
warnings.filterwarnings("ignore", message="Specifying the ProgressBarLogger via `loggers`")
warnings.filterwarnings("ignore", message="ResumableProgressBar is not in the state_dict")



_composer_signal_file_name = dist.get_node_signal_file_name


def _signal_file_per_node(rng=None) -> str:
    """Composer's autoresume has each node's local rank 0 create and then remove a signal file whose name
    rank 0 broadcasts, so it is the same on every node: with the run folder on a shared filesystem (as on
    clusters) the second node's remove fails. Adding the node rank keeps each node's wait its own."""
    return f"{_composer_signal_file_name(rng)}-node{dist.get_node_rank()}"


dist.get_node_signal_file_name = _signal_file_per_node

TIME_KEYS = ("max_duration", "save_interval", "eval_interval", "log_interval", "scheduler.warmup")


def _time(cfg: DictConfig, key: str) -> Time:
    value = str(OmegaConf.select(cfg, key))
    try:
        return Time.from_timestring(value)
    except ValueError:
        raise SlmError(f"config key '{key}' = '{value}' is not a time: use a number with a unit, "
                       "e.g. 2000ba (batches), 10ep (epochs), 5000000tok (tokens)") from None


def _optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _publishing(cfg: DictConfig, folder: Path, saver: CheckpointSaver) -> tuple[list, list]:
    """(loggers, callbacks to place after the CheckpointSaver) for the Hub and W&B settings."""
    loggers, callbacks = [], []
    if cfg.hub.repo:
        hub = Hub(cfg.hub.retries, cfg.hub.retry_wait)
        loggers.append(HubCheckpoints(hub, cfg.hub.repo, folder, cfg.hub.private))
        if cfg.hub.export:
            callbacks.append(ExportToHub(hub, cfg.hub.repo, folder, saver, cfg.hub.private))
    w = cfg.logging.wandb
    if w.project:
        loggers.append(WandB(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                             init_kwargs={"id": wandb_run_id(cfg.run_name), "resume": "allow", "dir": str(folder),
                                          "config": OmegaConf.to_container(cfg, resolve=True)}))
    return loggers, callbacks


def build_trainer(cfg: DictConfig) -> Trainer:
    """Everything checked first, then the Trainer (which autoresumes)."""
    times = {key: _time(cfg, key) for key in TIME_KEYS}
    if cfg.logging.wandb.project:
        check_wandb_login(cfg.logging.wandb.project)
    gpu = torch.cuda.is_available()
    device = "gpu" if gpu else "cpu"
    if cfg.device_microbatch_size == "auto" and not gpu:
        raise SlmError("device_microbatch_size=auto needs a GPU; give a number on CPU")
    dist.initialize_dist(device)
    world = dist.get_world_size()
    if cfg.global_batch_size % world:
        raise SlmError(f"global_batch_size {cfg.global_batch_size} is not divisible by the {world} processes")
    per_device = cfg.global_batch_size // world

    train_meta, eval_meta = split_metadata(cfg.data.train, "train"), split_metadata(cfg.data.eval, "eval")
    tokenizer_name = cfg.tokenizer or train_meta["tokenizer"]["name"]
    tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer_identity(tokenizer, "")["content_hash"] != train_meta["tokenizer"]["content_hash"]:
        raise SlmError(f"tokenizer {tokenizer_name} is not the one data.train was tokenized with "
                       "(content hashes differ)")
    hf_model = build_hf_model(dict(cfg.model), cfg.seed)
    check_compatible(train_meta, eval_meta, hf_model.config.vocab_size,
                     getattr(hf_model.config, "max_position_embeddings", None))
    table = byte_lengths(tokenizer)
    model = CausalLM(hf_model, tokenizer, metrics=build_metrics(table), eval_metrics=build_metrics(table))

    folder = Path(cfg.save_folder.format(run_name=cfg.run_name))
    early = early_batches(cfg.early_checkpoints)
    if dist.get_local_rank() == 0:
        clean_stale_shared_memory()
    _refuse_another_model(folder, cfg)
    if dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)  # W&B, set up inside Trainer(), writes into it
        repair_latest(folder)
    dist.barrier()

    train_data = build_dataloader(cfg.data.train, cfg.data, per_device, train=True)
    eval_data = build_dataloader(cfg.data.eval, cfg.data, per_device, train=False)
    # Composer hands each checkpoint to every logger's upload_file under the remote names (a no-op without hub.repo).
    saver = CheckpointSaver(folder=str(folder), filename="ep{epoch}-ba{batch}-rank{rank}.pt",
                            latest_filename="latest-rank{rank}.pt", save_interval=save_schedule(
                                cfg.save_interval, early), overwrite=True,
                            remote_file_name=f"{REMOTE_FOLDER}/ep{{epoch}}-ba{{batch}}-rank{{rank}}.pt",
                            latest_remote_file_name=f"{REMOTE_FOLDER}/latest-rank{{rank}}.pt")
    publish_loggers, publish_callbacks = _publishing(cfg, folder, saver)
    metrics = MetricsFile(folder / "metrics.jsonl")
    run_info = RunInfo(cfg, tokenizer_name, count_parameters(hf_model), folder, metrics)
    interactive = sys.stderr.isatty()
    clipping = [GradientClipping(clipping_type="norm", clipping_threshold=cfg.grad_clip)] if cfg.grad_clip else []
    try:
        trainer = Trainer(
            model=model,
            run_name=cfg.run_name,
            seed=cfg.seed,
            device=device,
            precision=cfg.precision or ("amp_bf16" if gpu else "fp32"),
            max_duration=times["max_duration"],
            train_dataloader=train_data,
            eval_dataloader=Evaluator(label="eval", dataloader=eval_data, metric_names=list(model.val_metrics)),
            eval_interval=times["eval_interval"],
            eval_subset_num_batches=cfg.eval_batches,
            device_train_microbatch_size=cfg.device_microbatch_size or per_device,
            optimizers=_optimizer(hf_model, cfg.optimizer),
            schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=times["scheduler.warmup"],
                                                          alpha_f=cfg.scheduler.alpha_f),
            algorithms=clipping,
            callbacks=[SpeedMonitor(window_size=10), LRMonitor(), run_info, WriteMetricsRow(metrics), StopOnSignal(),
                       saver, *publish_callbacks, KeepNewestPeriodic(folder, cfg.keep, early)],
            loggers=[metrics, *publish_loggers, *([ResumableProgressBar()] if interactive else [])],
            save_folder=str(folder),
            autoresume=True,
            spin_dataloaders=False,  # Streaming restores its own position
            progress_bar=False,  # the ResumableProgressBar logger instead, when interactive
            log_to_console=not interactive,
            console_log_interval=times["log_interval"],
            deterministic_mode=not gpu,
            python_log_level="WARNING" if dist.get_global_rank() == 0 else "ERROR",
        )
    except RuntimeError as e:  # autoresume found a checkpoint whose tensors do not fit (no run.json to tell first)
        if "state_dict" not in str(e):
            raise
        raise SlmError(f"the checkpoint in {folder} does not fit this model ({str(e).splitlines()[-1].strip()}): "
                       "use another run_name or save_folder, or this run's model config to resume it") from None
    if dist.get_global_rank() == 0:
        save_config(cfg, folder / "config.yaml")  # only now: a refused start leaves the folder as it was
    return trainer


def _refuse_another_model(folder: Path, cfg: DictConfig) -> None:
    """Resuming a run folder with another model config would fail deep in Composer: name the difference."""
    try:
        before = json.loads((folder / "run.json").read_text())["config"]["model"]
    except (OSError, ValueError, KeyError):
        return
    now = OmegaConf.to_container(cfg.model, resolve=True)
    differ = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if differ:
        k = differ[0]
        raise SlmError(f"{folder} holds a run of another model (model.{k} is {before.get(k)} there, {now.get(k)} "
                       "here): use another run_name or save_folder, or the same model config to resume it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="yaml file, e.g. yamls/mamba-100k.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_duration=50ba")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = build_trainer(cfg)
        finished = trainer.state.get_elapsed_duration() >= 1
        if dist.get_global_rank() == 0:
            batch = int(trainer.state.timestamp.batch)
            print(f"slm train: {cfg.run_name}: " + (f"resumed at batch {batch}" if batch else "starting at batch 0")
                  + f" of {cfg.max_duration}" + ("; already finished (a larger max_duration continues it)"
                                                 if finished else ""), file=sys.stderr, flush=True)
        if finished:  # a resubmitted or requeued job whose run is done: nothing to do, not an error
            trainer.close()
            return 0
        trainer.fit()
        trainer.close()
        stop = next(c for c in trainer.state.callbacks if isinstance(c, StopOnSignal))
        if stop.stopped_at is not None:
            if dist.get_global_rank() == 0:
                print(f"slm train: {cfg.run_name}: stopped at batch {stop.stopped_at} on {stop.received}, checkpoint "
                      "saved; the same command resumes it", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
    except Exception as e:
        folder = cfg.save_folder.format(run_name=cfg.run_name) if cfg else None
        problem = str(e) if isinstance(e, SlmError) else disk_error(e, where=folder)
        if args.debug or problem is None:
            raise
        if dist.get_global_rank() == 0:  # every rank fails alike: say it once
            print(f"slm train: error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a run checks before it starts, and nothing written meanwhile: the process group joined, the config, the data
and the model checked against each other (`preflight`, whose `Plan` the Trainer is made from), then the run folder
made ready (`prepare_run_folder`): another model's run in it refused, `latest` repaired."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from composer.utils import dist
from torchmetrics import Metric
from transformers import PreTrainedModel

from slm.core import wandb_workarounds
from slm.core.config import TrainConfig
from slm.core.errors import SlmError
from slm.core.run_folder import checked_run_folder, newest_complete, read_run_record, repair_latest
from slm.core.shared_memory import clean_stale_shared_memory
from slm.data.loading import check_data_fits, split_metadatas
from slm.data.tokenizer import load_tokenizer, tokenizer_identity
from slm.training.metrics import build_metrics, byte_lengths
from slm.training.model import CausalLM, build_hf_model, context_length, use_special_tokens
from slm.training.warm_start import check_fits


@dataclass
class Plan:
    """What preflight checked and built: everything the Trainer needs that does not touch the run folder."""

    cfg: TrainConfig
    gpu: bool
    per_device_batch: int
    seq_len: int  # tokens of every sample
    tokenizer_identity: dict  # its identity (slm/data/tokenizer.py `tokenizer_identity`): name, ids, content hash
    model: CausalLM
    train_metrics: list[Metric]  # updated and logged by the TrainMetrics callback, not by Composer


def join_process_group(gpu: bool, timeout: float) -> None:
    """Have every process of the run join the process group (Composer's `dist.initialize_dist`); the rendezvous that
    did not happen within `timeout` is one line naming its host and port. Under torchrun, which names the node's
    rank GROUP_RANK, Composer is given it as NODE_RANK, the name Composer's launcher uses."""
    if "GROUP_RANK" in os.environ:
        os.environ.setdefault("NODE_RANK", os.environ["GROUP_RANK"])
    try:
        dist.initialize_dist("gpu" if gpu else "cpu", timeout)
    except Exception as e:  # torch's store and network errors (DistError, RuntimeError, TimeoutError)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise SlmError(f"the processes of this run did not all meet at the rendezvous {where} within "
                       f"{timeout:g} s (dist_timeout): check that every node of the job started and reaches "
                       f"{where} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e


def preflight(cfg: TrainConfig) -> Plan:
    """Run every check of the config, the data and the model against each other; nothing is written."""
    if cfg.deterministic:  # cuBLAS reads it when CUDA starts, before Composer's deterministic mode would set it
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.logging.wandb.project:
        wandb_workarounds.check_wandb_login(cfg.logging.wandb.project)
    gpu = torch.cuda.is_available()
    if cfg.device_microbatch_size == "auto" and not gpu:
        raise SlmError("device_microbatch_size=auto needs a GPU; give a number on CPU")
    join_process_group(gpu, cfg.dist_timeout)
    world = dist.get_world_size()
    if cfg.global_batch_size % world:
        raise SlmError(f"global_batch_size {cfg.global_batch_size} is not divisible by the {world} processes")

    metas = split_metadatas(cfg.data.train, "train") + split_metadatas(cfg.data.eval, "eval")  # each folder/stream
    tokenizer_name = cfg.tokenizer or metas[0][1]["tokenizer"]["name"]  # the (first) train folder's
    tokenizer = load_tokenizer(tokenizer_name)
    hf_model = build_hf_model(cfg.model, cfg.seed)
    use_special_tokens(hf_model, tokenizer)  # after building: pad_token_id would be llama's padding_idx
    check_data_fits(metas, tokenizer, tokenizer_name, hf_model.config.vocab_size, context_length(hf_model.config))
    table = byte_lengths(tokenizer)
    model = CausalLM(hf_model, tokenizer, eval_metrics=build_metrics(table))
    return Plan(cfg, gpu, cfg.global_batch_size // world, metas[0][1]["seq_len"],
                tokenizer_identity(tokenizer, tokenizer_name), model, build_metrics(table, sync=world > 1))


def prepare_run_folder(cfg: TrainConfig, model: PreTrainedModel) -> Path | None:
    """Make the run folder ready to start or resume in, on every process; return its newest whole checkpoint (None: a
    new run).

    Streaming shared memory that killed runs left on this node is removed (only blocks no living
    process maps); a folder with a link leading outside it (a run folder handed over: slm/core/foreign.py), or holding
    another model's run, is refused before anything in it changes;
    rank 0 creates the folder (W&B, set up inside Trainer(), writes into it) and points `latest`
    at the newest whole checkpoint (a kill can leave a torn file or no symlink); the others wait.
    """
    folder = checked_run_folder(cfg.folder)
    if dist.get_local_rank() == 0:
        clean_stale_shared_memory()
    newest = newest_complete(folder)  # once: the check reads each candidate's pickle
    refuse_another_model(cfg, model, newest)
    if dist.get_global_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        repair_latest(folder, newest)
    dist.barrier()
    return newest


def refuse_another_model(cfg: TrainConfig, model: PreTrainedModel, newest: Path | None) -> None:
    """Refuse to resume a run folder with another model config, which would fail deep in Composer: name the difference.

    run.json names the model config; a folder without one (an older slm, a copied checkpoint) is
    compared tensor by tensor with its newest whole checkpoint, `newest`.
    """
    hint = "use another run_name or save_folder, or this run's model config to resume it"
    folder = cfg.folder
    before = ((read_run_record(folder) or {}).get("config") or {}).get("model")
    if before is not None:
        differ = [k for k in sorted(set(before) | set(cfg.model)) if before.get(k) != cfg.model.get(k)]
        if differ:
            k = differ[0]
            raise SlmError(f"{folder} holds a run of another model (model.{k} is {before.get(k)} there, "
                           f"{cfg.model.get(k)} here): {hint}")
        return
    if newest is not None:
        check_fits(newest, model, hint)

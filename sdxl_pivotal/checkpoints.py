"""Save and restore the complete training state: `checkpoint-N/` folders that are complete or absent.

A checkpoint holds
- the output files at step N, with the final output's names and formats (usable as-is): the LoRA
  `pytorch_lora_weights.safetensors` and, with pivotal tuning, `<name>_emb.safetensors`;
- `trainable_state.safetensors`: every trainable parameter, by name, exactly as in memory;
- `optimizer.safetensors`: the optimizer's tensors (moments, Prodigy's estimates, ...);
- `training_config.yaml`: the run's flags (config.py), so the checkpoint says how it was made;
- `training_state.json`: the step, the seed, the optimizer's and schedulers' plain values. Written last.
Everything is written into a temporary folder that is renamed to `checkpoint-N` only when complete, so a
crash mid-write never leaves a checkpoint that `--resume_from_checkpoint latest` would pick up.
Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError
from .export import atomic_folder

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
PARAMS_FILE = "trainable_state.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class ResumePoint:
    step: int
    seed: int


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished `checkpoint-N` folders in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """The folder `--resume_from_checkpoint` names: a path, a name inside `output_dir`, or "latest"."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        path = output_dir / spec
    if not (path / STATE_FILE).is_file():
        raise InputError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another or start afresh.")
    return path


def _trainable_named_parameters(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {
        f"{model_name}.{name}": param
        for model_name, model in models.items()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer `state_dict()` -> (its tensors, by "param_index.key"; everything else, JSON-ready)."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().clone()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in plain["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    output_dir: Path,
    step: int,
    seed: int,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    write_outputs: Callable[[Path], None],
    grad_scaler=None,
    total_limit: int | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically, then drop the oldest beyond `total_limit`.

    `write_outputs(folder)` writes the user-facing files (LoRA, embeddings) as for the final output.
    """
    target = output_dir / f"checkpoint-{step}"
    with atomic_folder(target) as staging:
        write_outputs(staging)
        params = _trainable_named_parameters(models)
        save_file({k: p.detach().contiguous() for k, p in params.items()}, staging / PARAMS_FILE)
        optimizer_tensors, optimizer_plain = _split_optimizer_state(optimizer.state_dict())
        save_file(optimizer_tensors, staging / OPTIMIZER_FILE)
        state = {
            "step": step,
            "seed": seed,
            "optimizer": optimizer_plain,
            "lr_scheduler": lr_scheduler.state_dict(),
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        }
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
    if total_limit is not None:
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            logger.info("Removing %s (--checkpoints_total_limit %d)", old, total_limit)
            shutil.rmtree(old)
    return target


def read_resume_point(checkpoint: Path) -> ResumePoint:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return ResumePoint(step=state["step"], seed=state["seed"])


def load_checkpoint(
    checkpoint: Path,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    grad_scaler=None,
) -> ResumePoint:
    """Restore parameters, optimizer, schedules from `checkpoint`; return the step to continue from."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved = load_file(checkpoint / PARAMS_FILE)
    params = _trainable_named_parameters(models)
    if set(saved) != set(params) or any(saved[k].shape != p.shape for k, p in params.items()):
        raise InputError(
            f"{checkpoint} was made with other LoRA settings (rank, targets or text-encoder training) than "
            "this run. Resume with the flags of the original run, or start a new --output_dir."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(_join_optimizer_state(load_file(checkpoint / OPTIMIZER_FILE), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if grad_scaler is not None and state["grad_scaler"] is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    return ResumePoint(step=state["step"], seed=state["seed"])


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete staging folders left by a run that crashed while writing a checkpoint."""
    if output_dir.is_dir():
        for leftover in output_dir.glob(".checkpoint-*.partial-*"):
            logger.warning("Removing unfinished checkpoint %s from an interrupted run.", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

"""Save and restore the complete training state: `checkpoint-N/` folders that are complete or absent.

A checkpoint holds
- the output files at step N, with the final output's names and formats (usable as-is): the LoRA
  `pytorch_lora_weights.safetensors` and, with pivotal tuning, `<name>_emb.safetensors`;
- `trainable_state.safetensors`: every trainable parameter, by name, exactly as in memory;
- `optimizer.safetensors`: the optimizer's tensors (moments, Prodigy's estimates, ...);
- `training_config.yaml`: the run's flags (config.py), so the checkpoint says how it was made;
- `training_state.json`: the step, the seed, the optimizer's and schedulers' plain values. Written last.
Everything is written into a temporary folder that is renamed to `checkpoint-N` only when complete, so a
crash mid-write never leaves a checkpoint that `--resume_from_checkpoint latest` would pick up; a write that
fails (a full disk) leaves the earlier checkpoints as they were. Before anything loads, the checkpoint to
resume from is checked file by file: "latest" falls back to the newest one that is whole.
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

from .config import CONFIG_FILE
from .errors import InputError, WriteError
from .export import LORA_WEIGHTS_NAME, TEMPORARY_PATTERN, atomic_folder, embeddings_file_name, output_name

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
PARAMS_FILE = "trainable_state.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# What a checkpoint holds besides its state (the user-facing files): safetensors only; and the run's flags.
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


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


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a file missing, truncated or unreadable), or None if it can.
    Reads the state file and every safetensors header (which fails on a truncated file), not the tensors."""
    from safetensors import SafetensorError, safe_open

    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        return f"it has no {STATE_FILE} (written last, so the checkpoint is unfinished)"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{state_path} is unreadable ({error})"
    missing = [key for key in ("step", "seed", "optimizer", "lr_scheduler") if key not in state]
    if missing:
        return f"{state_path} lacks {', '.join(missing)}"
    for name in (PARAMS_FILE, OPTIMIZER_FILE):
        if not (checkpoint / name).is_file():
            return f"{checkpoint / name} is missing"
    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            return f"{path} is damaged or truncated ({error})"
    return None


def resolve_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names (a path, a name inside `output_dir`, or "latest"),
    checked before anything loads. "latest": the newest whole one, saying which were skipped and why."""
    if spec == "latest":
        for candidate in reversed(complete_checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            logger.warning("Skipping checkpoint %s: %s.", candidate, problem)
        return None
    path = Path(spec)
    if not path.exists():
        path = output_dir / spec
    problem = checkpoint_problem(path)
    if problem is not None:
        raise InputError(
            f"Cannot resume from {path}: {problem}. Pass another checkpoint (or latest, the newest whole one), "
            "or start afresh."
        )
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
    try:
        _write_checkpoint(target, step, seed, models, optimizer, lr_scheduler, write_outputs, grad_scaler)
    except WriteError as error:
        earlier = complete_checkpoints(output_dir)
        intact = f"{earlier[-1].name} is intact" if earlier else "there is no earlier checkpoint"
        raise WriteError(
            f"{error} {target.name} was not saved; {intact}. Once fixed, rerun with --resume_from_checkpoint latest."
        ) from error
    if total_limit is not None:
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            logger.info("Removing %s (--checkpoints_total_limit %d)", old, total_limit)
            shutil.rmtree(old)
    return target


def checkpoint_due(args, step: int, steps_per_epoch: int) -> bool:
    """Whether optimizer step `step` (1-based) ends with a checkpoint: every --checkpointing_steps steps, and
    with --save_every_n_epochs at the end of every N-th epoch."""
    if step % args.checkpointing_steps == 0:
        return True
    every = args.save_every_n_epochs
    return every is not None and step % steps_per_epoch == 0 and (step // steps_per_epoch) % every == 0


def remove_expired_epoch_checkpoint(output_dir: Path, args, step: int, steps_per_epoch: int) -> None:
    """--save_last_n_epochs K, at the save of epoch e (step `step`): the checkpoint of epoch e - K x
    --save_every_n_epochs goes, as kohya removes it, so the last K epoch saves remain."""
    epoch, rest = divmod(step, steps_per_epoch)
    if args.save_last_n_epochs is None or rest or epoch % args.save_every_n_epochs:
        return
    expired_epoch = epoch - args.save_last_n_epochs * args.save_every_n_epochs
    expired = output_dir / f"checkpoint-{expired_epoch * steps_per_epoch}"
    if expired_epoch > 0 and expired.is_dir():
        logger.info("Removing %s (--save_last_n_epochs %d)", expired, args.save_last_n_epochs)
        shutil.rmtree(expired)


def _write_checkpoint(
    target: Path, step: int, seed: int, models, optimizer, lr_scheduler, write_outputs, grad_scaler
) -> None:
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


def remove_earlier_run(output_dir: Path) -> None:
    """--overwrite_output_dir: delete what an earlier run wrote in `output_dir` (its checkpoints, final LoRA,
    embeddings, kohya file, validation and sample images), so that nothing of it is resumed or mistaken for this run's.
    Only files of ours are deleted; a checkpoint or validation folder holding anything else is refused, named.
    The model card (README.md) and tracker logs stay; the card is rewritten at the end."""
    from .formats.kohya import kohya_file_name  # formats/kohya.py imports this module

    if not output_dir.is_dir():
        return
    folders = [p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    image_folders = [output_dir / "validation", output_dir / "samples"]  # samples: --sample_prompts
    for images in image_folders:
        if images.is_dir():
            folders += [p for p in images.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+|final", p.name)]
    for folder in folders:
        suffixes = (".png",) if folder.parent in image_folders else CHECKPOINT_SUFFIXES
        ours = {CONFIG_FILE} if suffixes is CHECKPOINT_SUFFIXES else set()
        foreign = [
            p.name
            for p in folder.iterdir()
            if not (p.is_file() and (p.suffix in suffixes or p.name in ours)) and not TEMPORARY_PATTERN.match(p.name)
        ]
        if foreign:
            raise InputError(
                f"--overwrite_output_dir: {folder} holds files this trainer does not write ({', '.join(foreign[:3])})."
                " Move them out, or choose another --output_dir."
            )
    for folder in folders:
        logger.info("--overwrite_output_dir: removing %s of an earlier run.", folder)
        shutil.rmtree(folder)
    for file_name in (LORA_WEIGHTS_NAME, kohya_file_name(output_name(output_dir)), embeddings_file_name(output_dir)):
        if (output_dir / file_name).is_file():
            logger.info("--overwrite_output_dir: removing %s of an earlier run.", output_dir / file_name)
            (output_dir / file_name).unlink()

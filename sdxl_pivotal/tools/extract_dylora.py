"""Cut a DyLoRA (trained with --adapter dylora) into one ordinary LoRA per trained rank: <stem>-r4.safetensors, ...

For each rank r = unit, 2·unit, ..., the largest module rank (unit: --unit, else as the file records it), every
module keeps the first r rows of lora_down (PEFT's lora_A) and columns of lora_up (lora_B), or all of them where its
rank is lower, and its alpha. The loaders then scale by alpha / r, the scale the trainer's rank-r truncation
trained with (sdxl_pivotal/dylora.py); a module without an alpha had alpha = its rank, which is written. The last
file, at full rank, is the input itself. RUN_OR_FILE is a LoRA file, kohya or diffusers (the outputs have its
format), or a run's output folder or checkpoint, whose two files are both cut: the kohya `<run>.safetensors`
(bundled embeddings kept) and `pytorch_lora_weights.safetensors` (the run's `<run>_emb.safetensors` stays the
embeddings of every rank). --base gives a diffusers file's module tree (default: SDXL base). Nothing is written
unless every output is new (or --overwrite).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import InputError
from ..export import LORA_WEIGHTS_NAME, output_name
from ..formats.architecture import empty_sdxl_models
from ..formats.kohya import kohya_file_name, kohya_modules
from .files import existing_dir, existing_file, new_output, read_lora, with_new_ranks, write_lora


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="RUN_OR_FILE", help="a LoRA file (.safetensors), or a run's output folder")
    parser.add_argument(
        "--unit",
        type=int,
        default=None,
        help="the run's --dylora_unit, the step between ranks (default: as the run's kohya file records it)",
    )
    parser.add_argument("--output", default=None, help="folder to write in (default: the input's folder)")
    parser.add_argument(
        "--base", default=None, help="SDXL pipeline folder whose configs give the module tree (default: SDXL base)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> None:
    for path in extract_dylora(args.input, args.unit, args.output, args.base, args.overwrite):
        print(f"wrote {path}")


def extract_dylora(
    source: str | Path,
    unit: int | None = None,
    output: str | Path | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the rank-`unit`, 2·`unit`, ... truncations of the LoRA file(s) of `source`; return the files written.
    Without `unit`, the one the files record (the trainer's kohya file does)."""
    if unit is not None and unit < 1:
        raise InputError(f"--unit {unit}: the step between ranks is at least 1 (the run's --dylora_unit).")
    source = Path(source)
    inputs = run_files(source) if source.is_dir() else [existing_file(source)]
    folder = Path(output) if output is not None else (source if source.is_dir() else source.parent)
    models = empty_sdxl_models(base)
    loras = [read_lora(path, models) for path in inputs]
    unit = unit or recorded_unit(loras, inputs)
    plans = []
    for path, lora in zip(inputs, loras, strict=True):
        ranks = range(unit, max_rank(lora.lora, unit, path) + 1, unit)
        outputs = [new_output(folder / f"{path.stem}-r{rank}.safetensors", overwrite, *inputs) for rank in ranks]
        plans.append((lora, list(zip(ranks, outputs, strict=True))))
    written = []
    for lora, targets in plans:  # every output was checked: now write
        for rank, target in targets:
            truncated = with_new_ranks(lora, truncated_state(lora.lora, rank), target.stem, base)
            written += write_lora(target, truncated, models)
    return written


def recorded_unit(loras: list, paths: list[Path]) -> int:
    """The DyLoRA unit in kohya's `ss_network_args` of the first file that records one."""
    for lora in loras:
        unit = json.loads(lora.metadata.get("ss_network_args", "{}")).get("unit")
        if unit is not None:
            return int(unit)
    names = ", ".join(path.name for path in paths)
    raise InputError(f"{names} record(s) no DyLoRA unit: pass --unit (the run's --dylora_unit).")


def run_files(folder: Path) -> list[Path]:
    """The LoRA files of a run's output folder (or of one of its checkpoints): the kohya file named after the run,
    and the diffusers file."""
    folder = existing_dir(folder)
    run = folder.parent if folder.name.startswith("checkpoint-") else folder
    files = [folder / kohya_file_name(output_name(run)), folder / LORA_WEIGHTS_NAME]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise InputError(f"{folder} is not a run's output folder: it has no {', '.join(missing)}. Pass a LoRA file.")
    return files


def max_rank(state: dict[str, torch.Tensor], unit: int, path: Path) -> int:
    """The largest module rank of a kohya LoRA state; every module a plain LoRA whose rank is a multiple of `unit`."""
    ranks = []
    for module, tensors in kohya_modules(state).items():
        if "lora_down.weight" not in tensors or "dora_scale" in tensors:
            raise InputError(f"{path}: {module} is not a plain LoRA module; only a DyLoRA (LoRA) can be cut by rank.")
        rank = tensors["lora_down.weight"].shape[0]
        if rank % unit:
            raise InputError(
                f"{path}: {module} has rank {rank}, not a multiple of --unit {unit}; pass the run's --dylora_unit."
            )
        ranks.append(rank)
    return max(ranks)


def truncated_state(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA state with each module cut to its leading min(`rank`, its rank) ranks, alphas kept."""
    truncated = {}
    for module, tensors in kohya_modules(state).items():
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        kept = min(rank, down.shape[0])
        alpha = tensors["alpha"] if "alpha" in tensors else torch.tensor(float(down.shape[0]))
        truncated |= {
            f"{module}.lora_down.weight": down[:kept].contiguous(),
            f"{module}.lora_up.weight": up[:, :kept].contiguous(),
            f"{module}.alpha": alpha,
        }
    return truncated

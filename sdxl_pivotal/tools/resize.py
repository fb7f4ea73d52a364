"""Lower a LoRA's rank by SVD of each module's update ΔW = (alpha / rank) · up · down.

Each module gets its best approximation of rank --rank (its own rank where that is lower) or, with --energy E, of the
smallest rank that keeps the fraction E of its energy (at most --rank when both are given). The new alpha is the new
rank: the scale is folded into the factors. DoRA magnitudes are kept as they are. Prints the retained energy (kept
squared singular values over all of them) per module and overall. The output has the input's format, kohya or
diffusers; --base gives a diffusers file's module tree (default: SDXL base).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..formats.architecture import empty_sdxl_models
from ..formats.families import lora_to_kohya
from ..formats.kohya import kohya_modules
from .files import existing_file, new_output, read_lora, with_new_ranks, write_lora
from .lowrank import (
    RetainedEnergy,
    check_rank_and_energy,
    chosen_rank,
    lora_factors,
    print_energy_report,
    retained_energy,
    svd_of_product,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA file (.safetensors), kohya or diffusers format")
    parser.add_argument("output", help="file to write (.safetensors), in the input's format")
    parser.add_argument("--rank", type=int, default=None, help="new rank (the most, with --energy)")
    parser.add_argument("--energy", type=float, default=None, help="keep this fraction of each module's energy")
    parser.add_argument(
        "--base", default=None, help="SDXL pipeline folder whose configs give the module tree (default: SDXL base)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> None:
    written, report = resize_lora(args.input, args.output, args.rank, args.energy, args.base, args.overwrite)
    print_energy_report(report)
    for path in written:
        print(f"wrote {path}")


def resize_lora(
    input_file: str | Path,
    output: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[list[Path], list[RetainedEnergy]]:
    """Write `input_file` resized to `rank` / `energy` as `output`; return the files and the energy report."""
    check_rank_and_energy(rank, energy)
    source = existing_file(input_file)
    output = new_output(output, overwrite, source)
    models = empty_sdxl_models(base)
    lora = read_lora(source, models)
    resized, report = resize_state(lora.lora, rank, energy)
    return write_lora(output, with_new_ranks(lora, resized, output.stem, base), models), report


def resize_state(
    state: dict[str, torch.Tensor], rank: int | None, energy: float | None
) -> tuple[dict[str, torch.Tensor], list[RetainedEnergy]]:
    """A kohya LoRA resized module by module, and what each module keeps."""
    resized, report = {}, []
    for module, tensors in kohya_modules(state).items():
        new_tensors, kept = resize_module(module, tensors, rank, energy)
        resized |= {f"{module}.{key}": value for key, value in new_tensors.items()}
        report.append(kept)
    return resized, report


def resize_module(
    module: str, tensors: dict[str, torch.Tensor], rank: int | None, energy: float | None
) -> tuple[dict[str, torch.Tensor], RetainedEnergy]:
    """One kohya module's tensors at the chosen rank (alpha = that rank), and what it keeps."""
    if "lora_down.weight" not in tensors:
        raise InputError(f"{module}: not a LoRA module ({', '.join(sorted(tensors))}); only LoRA can be resized.")
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    scale = float(tensors["alpha"]) / down.shape[0] if "alpha" in tensors else 1.0
    u, sigma, vh = svd_of_product(scale * up.flatten(1).double(), down.flatten(1).double())
    new_rank = chosen_rank(sigma, rank, energy)
    new_down, new_up = lora_factors(u, sigma, vh, new_rank, torch.Size([up.shape[0], *down.shape[1:]]))
    factors = {"lora_A.weight": new_down.to(down.dtype), "lora_B.weight": new_up.to(up.dtype)}
    if "dora_scale" in tensors:
        factors["lora_magnitude_vector"] = tensors["dora_scale"]
    new_tensors = lora_to_kohya(factors, 1.0)
    return new_tensors, retained_energy(module, sigma, new_rank)

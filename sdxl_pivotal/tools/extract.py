"""Extract a LoRA from the difference between a fine-tuned UNet and its base, by SVD per module.

Every Linear module (and, with --conv, every 1x1 and 3x3 Conv2d) whose weights differ, ‖W_tuned − W_base‖ >
--min_diff · ‖W_base‖, gets the best approximation of ΔW = W_tuned − W_base of rank --rank (with --energy, of the
smallest rank that keeps that fraction of its energy, at most --rank), with alpha = its rank; modules that do not
differ are left out. Prints the retained energy per module and overall. --base and --tuned are diffusers pipeline
folders or UNet folders; the output is a kohya file (default) or a diffusers file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..formats.families import lora_to_kohya
from ..formats.kohya import kohya_state_metadata
from ..formats.names import kohya_module_names
from .files import FORMATS, LoraFile, existing_dir, new_output, write_lora
from .lowrank import (
    RetainedEnergy,
    check_rank_and_energy,
    chosen_rank,
    lora_factors,
    print_energy_report,
    retained_energy,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="LoRA file to write (.safetensors)")
    parser.add_argument("--base", required=True, help="base pipeline folder (or its UNet folder)")
    parser.add_argument("--tuned", required=True, help="fine-tuned pipeline folder (or its UNet folder)")
    parser.add_argument("--rank", type=int, required=True, help="rank of each module (the most, with --energy)")
    parser.add_argument("--energy", type=float, default=None, help="keep this fraction of each module's energy")
    parser.add_argument("--conv", action="store_true", help="also extract the 1x1 and 3x3 Conv2d modules")
    parser.add_argument(
        "--min_diff", type=float, default=1e-4, help="leave out modules with ‖ΔW‖ <= this × ‖W‖ (default 1e-4)"
    )
    parser.add_argument("--to", choices=FORMATS, default="kohya", help="output format (default: kohya)")
    parser.add_argument("--name", default=None, help="kohya output: its name in the metadata (default: output stem)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> None:
    written, report = extract_lora(
        args.base,
        args.tuned,
        args.output,
        args.rank,
        args.energy,
        args.conv,
        args.min_diff,
        args.to,
        args.name,
        args.overwrite,
    )
    print_energy_report(report)
    for path in written:
        print(f"wrote {path}")


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    output: str | Path,
    rank: int,
    energy: float | None = None,
    conv: bool = False,
    min_diff: float = 1e-4,
    to: str = "kohya",
    name: str | None = None,
    overwrite: bool = False,
) -> tuple[list[Path], list[RetainedEnergy]]:
    """Write the LoRA of `tuned` − `base` as `output`; return the files and the energy report."""
    check_rank_and_energy(rank, energy)
    output = new_output(output, overwrite, Path(base), Path(tuned))
    base_unet, tuned_unet = load_unet(base), load_unet(tuned)
    state, report = difference_lora(base_unet, tuned_unet, rank, energy, conv, min_diff)
    if not state:
        raise InputError(f"{tuned} and {base}: no module differs by more than --min_diff {min_diff}.")
    metadata = kohya_state_metadata(state, name or output.stem, str(base)) if to == "kohya" else {}
    return write_lora(output, LoraFile(to, state, metadata=metadata), {"unet": tuned_unet}), report


def load_unet(folder: str | Path) -> torch.nn.Module:
    """The UNet of a diffusers pipeline folder, or of a UNet folder."""
    from diffusers import UNet2DConditionModel

    folder = existing_dir(folder)
    if (folder / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    if (folder / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(folder)
    raise InputError(f"{folder} is neither a diffusers pipeline folder (unet/config.json) nor a UNet folder.")


def difference_lora(
    base_unet: torch.nn.Module,
    tuned_unet: torch.nn.Module,
    rank: int,
    energy: float | None,
    conv: bool,
    min_diff: float,
) -> tuple[dict[str, torch.Tensor], list[RetainedEnergy]]:
    """The kohya LoRA of the modules in which the two UNets differ, and what each module keeps."""
    names = kohya_module_names("unet", tuned_unet)
    if names.keys() != kohya_module_names("unet", base_unet).keys():
        raise InputError("The base and fine-tuned UNets have different architectures.")
    state, report = {}, []
    for path, name in names.items():
        tuned_weight = tuned_unet.get_submodule(path).weight.detach()
        base_weight = base_unet.get_submodule(path).weight.detach()
        if tuned_weight.dim() > 2 and not conv:
            continue
        if tuned_weight.shape != base_weight.shape:
            raise InputError(f"{path}: {tuple(tuned_weight.shape)} fine-tuned, {tuple(base_weight.shape)} base.")
        delta = tuned_weight.float() - base_weight.float()
        if delta.norm() <= min_diff * base_weight.float().norm():
            continue
        u, sigma, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        new_rank = chosen_rank(sigma, rank, energy)
        down, up = lora_factors(u, sigma, vh, new_rank, delta.shape)
        factors = {"lora_A.weight": down.to(tuned_weight.dtype), "lora_B.weight": up.to(tuned_weight.dtype)}
        module = lora_to_kohya(factors, 1.0)
        state |= {f"{name}.{key}": value for key, value in module.items()}
        report.append(retained_energy(name, sigma, new_rank))
    return state, report

"""Parameters and file sizes of each adapter family on the real SDXL, at the trainer's defaults.

Builds SDXL base's UNet and both text encoders from their configs on the meta device (no weights, no download),
attaches the adapters exactly as the trainer does for each command line (`adapters.add_adapters`), and prints a
Markdown table: trainable parameters, and the tensor bytes of the diffusers file and of the kohya file (float32,
the trainer's output dtype; the few-kilobyte JSON header left out).

    python benchmarks/adapter_sizes.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdxl_pivotal.adapters import add_adapters
from sdxl_pivotal.args import build_parser
from sdxl_pivotal.formats.architecture import empty_sdxl_models
from sdxl_pivotal.formats.families import live_peft
from sdxl_pivotal.formats.kohya import kohya_state_dict

ROWS = {
    "LoRA (default: attention)": [],
    "LoRA + `--use_dora`": ["--use_dora"],
    "LoRA `--lora_target attn_ff`": ["--lora_target", "attn_ff"],
    "LoRA `--lora_target all_linear`": ["--lora_target", "all_linear"],
    "LoCon: LoRA `--conv_rank 4`": ["--conv_rank", "4"],
    "LoCon `--lora_target all_linear --conv_rank 4`": ["--lora_target", "all_linear", "--conv_rank", "4"],
    "LoHa `--adapter loha`": ["--adapter", "loha"],
    "LoHa `--adapter loha --conv_rank 4`": ["--adapter", "loha", "--conv_rank", "4"],
    "LoKr `--adapter lokr`": ["--adapter", "lokr"],
    "LoKr `--adapter lokr --lokr_factor 8 --conv_rank 4`": [
        "--adapter",
        "lokr",
        "--lokr_factor",
        "8",
        "--conv_rank",
        "4",
    ],
    "LoRA `--train_text_encoder` (UNet + both encoders)": ["--train_text_encoder"],
    "(IA)³ `--adapter ia3`": ["--adapter", "ia3"],
    "(IA)³ `--adapter ia3 --train_text_encoder`": ["--adapter", "ia3", "--train_text_encoder"],
}


def trainer_args(flags: list[str]) -> argparse.Namespace:
    """The trainer's flags with its defaults filled as `parse_args` fills them (no data needed here)."""
    args = build_parser().parse_args(["--pretrained_model_name_or_path", "sdxl", "--instance_prompt", "x", *flags])
    args.lora_alpha = float(args.rank)
    args.conv_alpha = float(args.conv_rank)
    return args


def sizes(flags: list[str]) -> tuple[int, int, int]:
    """(trainable parameters, diffusers-file tensor bytes, kohya-file tensor bytes) for one command line."""
    models = empty_sdxl_models()
    args = trainer_args(flags)
    add_adapters(SimpleNamespace(**models), args)
    adapted = {part: model for part, model in models.items() if hasattr(model, "peft_config")}
    params = sum(p.numel() for model in adapted.values() for p in model.parameters() if p.requires_grad)
    diffusers = sum(t.numel() * 4 for model in adapted.values() for t in live_peft(model).state.values())
    kohya = sum(t.numel() * 4 for t in kohya_state_dict(adapted).values())
    return params, diffusers, kohya


def main() -> None:
    print("| adapter (flags) | trainable parameters | diffusers file | kohya file |")
    print("|---|---:|---:|---:|")
    for label, flags in ROWS.items():
        params, diffusers, kohya = sizes(flags)
        print(f"| {label} | {params / 1e6:.2f} M | {diffusers / 1e6:.1f} MB | {kohya / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()

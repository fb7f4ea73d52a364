"""Which modules get an adapter, of which family (LoRA, LoHa, LoKr, (IA)³), rank, alpha and learning-rate scale.

The UNet's targets come from a preset (`--lora_target`) or a regex (`--lora_target_regex`), plus its convolutions
with `--conv_rank` (kohya's LoCon / "C3Lier"), inside the blocks of `--lora_unet_blocks` / `--use_blora`. Per-block
overrides (`--unet_block_ranks`, `--unet_block_conv_ranks`, `--unet_block_lr`) then set each module's rank and
learning-rate scale; a module whose rank or scale is 0 gets no adapter. The result is one explicit `AdapterPlan`
({module path: rank, alpha, lr scale}) that becomes a PEFT config with `rank_pattern` / `alpha_pattern`, so PEFT
builds the layers (LoHa, LoKr, DoRA and (IA)³ are PEFT's own; DyLoRA's are LoRA layers, truncated per step
by `dylora.py`).

(IA)³ (`--adapter ia3`) learns one scaling vector per module, no rank or alpha: on the UNet the paper's keys, values
and feed-forward (`to_k`, `to_v` scaled at their output, `ff.net.2` at its input), inside the blocks and at the
learning-rate scales of the block flags; on the text encoders `k_proj`, and `out_proj` and `fc2` at their input.
Scaling `out_proj`'s input is scaling `v_proj`'s output (the attention's weighted sum keeps each value channel), but
without touching `v_proj`'s bias, which PEFT would scale and the UIs' (IA)³ would not: so the kohya file holds
exactly what was trained.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

from .args import BlockLrPreset, parse_block_values, parse_unet_blocks
from .errors import InputError

UNET_ATTENTION_PROJECTIONS = ("to_k", "to_q", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
BLORA_BLOCKS = "up_blocks.0.attentions.0,up_blocks.0.attentions.1"
# (IA)³'s modules, and those of them scaled at their input (PEFT's "feedforward_modules").
IA3_UNET_TARGETS = ("to_k", "to_v", "ff.net.2")
IA3_TEXT_ENCODER_TARGETS = ("k_proj", "out_proj", "fc2")
IA3_INPUT_SCALED = ("ff.net.2", "out_proj", "fc2")
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
# kohya's block-weight presets are curves over SDXL's 9 SAI input_blocks (or output_blocks).
SAI_BLOCKS_PER_SIDE = 9
_SAI_PART = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def _ends_with(names: tuple[str, ...]) -> Callable[[str], bool]:
    suffixes = tuple("." + name for name in names)
    return lambda path: ".attentions." in path and path.endswith(suffixes)


# --lora_target: which Linear layers of the UNet's down/mid/up blocks get an adapter.
UNET_TARGET_PRESETS: dict[str, Callable[[str], bool]] = {
    "attn": _ends_with(UNET_ATTENTION_PROJECTIONS),  # the reference's choice
    "attn_ff": _ends_with(UNET_ATTENTION_PROJECTIONS + UNET_FEED_FORWARD),
    # every Linear of the attention blocks (proj_in/out, attention, feed-forward) and resnets (time_emb_proj):
    # kohya's LoRA targets, plus the resnets' timestep projections.
    "all_linear": lambda path: path.startswith(UNET_BLOCKS),
}


@dataclass(frozen=True)
class ModuleAdapter:
    """One adapted module: its rank, its alpha (scale = alpha / rank) and its learning-rate multiplier; (IA)³ has
    no rank or alpha (None)."""

    rank: int | None
    alpha: float | None
    lr_scale: float = 1.0


AdapterPlan = dict[str, ModuleAdapter]


def unet_adapter_plan(unet: torch.nn.Module, args: argparse.Namespace) -> AdapterPlan:
    """{UNet module path: ModuleAdapter} for the flags, every module checked against the UNet."""
    linear, conv = _adaptable_unet_modules(unet)
    if args.lora_target_regex:
        pattern = re.compile(args.lora_target_regex)
        selected = [path for path in linear + conv if pattern.fullmatch(path)]
        if not selected:
            raise InputError(
                f"--lora_target_regex {args.lora_target_regex!r} matches no Linear or Conv2d module of the UNet "
                f"(it must match a whole path, such as {linear[0]!r})."
            )
    elif args.adapter == "ia3":
        selected = [path for path in linear if _ends_with(IA3_UNET_TARGETS)(path)]
    else:
        selected = [path for path in linear if UNET_TARGET_PRESETS[args.lora_target](path)]
        if args.conv_rank:
            selected += [path for path in conv if path.startswith(UNET_BLOCKS)]
    blocks = BLORA_BLOCKS if args.use_blora else args.lora_unet_blocks
    if blocks is not None:
        selected = _inside_blocks(selected, parse_unet_blocks(blocks), linear + conv)

    conv_set = set(conv)
    ranks = _block_values(args.unet_block_ranks, "--unet_block_ranks", linear + conv)
    conv_ranks = _block_values(args.unet_block_conv_ranks, "--unet_block_conv_ranks", conv)
    lr_scales = _block_values(args.unet_block_lr, "--unet_block_lr", linear + conv, unet.config.layers_per_block)
    plan = {}
    for path in selected:
        is_conv = path in conv_set and bool(args.conv_rank)
        default_rank = args.conv_rank if is_conv else args.rank
        default_alpha = args.conv_alpha if is_conv else args.lora_alpha
        rank = int((conv_ranks if is_conv else ranks)(path, default_rank))
        lr_scale = lr_scales(path, 1.0)
        if rank == 0 or lr_scale == 0:
            continue  # kohya's convention: a block at rank 0 or learning rate 0 has no adapter
        if args.adapter == "ia3":
            plan[path] = ModuleAdapter(None, None, lr_scale)
            continue
        # Per-block ranks keep the scale alpha / rank of the default, so a block's rank changes its capacity only.
        plan[path] = ModuleAdapter(rank, default_alpha * rank / default_rank, lr_scale)
    if not plan:
        raise InputError("These flags leave no UNet module to adapt; check --lora_target and the block options.")
    return plan


def _adaptable_unet_modules(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(paths of the UNet's Linear layers, paths of its Conv2d layers)."""
    linear, conv = [], []
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.append(path)
        elif isinstance(module, torch.nn.Conv2d):
            conv.append(path)
    return linear, conv


def _inside_blocks(selected: list[str], blocks: list[str], every: list[str]) -> list[str]:
    """The selected paths inside one of `blocks`; each block must exist in the UNet."""
    for block in blocks:
        if not any(path.startswith(block + ".") for path in every):
            available = sorted({m.group(0) for p in every if (m := re.match(r".*?\.attentions\.\d+", p))})
            raise InputError(
                f"--lora_unet_blocks: this UNet has no block {block!r}. Its attention blocks: "
                + ", ".join("unet." + a for a in available)
            )
    return [path for path in selected if any(path.startswith(block + ".") for block in blocks)]


def _block_values(
    spec: str | None, flag: str, paths: list[str], layers_per_block: int | None = None
) -> Callable[[str, float], float]:
    """A lookup `(module path, default) -> value` for a per-block flag: the value of the longest block prefix of
    the path (a kohya preset gives the value of the path's SAI block), else the default. Every block the flag
    names must hold at least one of `paths`."""
    values = parse_block_values(spec, flag, presets=layers_per_block is not None) if spec else {}
    for block in values:
        if not any(path.startswith(block + ".") for path in paths):
            raise InputError(f"{flag}: the UNet has no adaptable module in {block!r}.")
    by_length = sorted(values, key=len, reverse=True)

    def lookup(path: str, default: float) -> float:
        value = next((values[block] for block in by_length if path.startswith(block + ".")), default)
        if isinstance(value, BlockLrPreset):
            return preset_weights(value)[sai_block_index(path, layers_per_block)]
        return value

    return lookup


def preset_weights(preset: BlockLrPreset) -> list[float]:
    """kohya's weights of a preset over the 9 SAI blocks of one side (index 0: input_blocks.0 / output_blocks.0),
    plus its offset; a weight of 0 or less is 0 (kohya's default zero threshold), and such a block has no adapter.
    sine rises from 0 (shallow) to 1 (deep), cosine falls from 1 to 0; linear and reverse_linear likewise."""
    ramp = [i / (SAI_BLOCKS_PER_SIDE - 1) for i in range(SAI_BLOCKS_PER_SIDE)]
    curves = {
        "sine": [math.sin(math.pi * x / 2) for x in ramp],
        "cosine": [math.sin(math.pi * x / 2) for x in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": ramp[::-1],
        "zeros": [0.0] * SAI_BLOCKS_PER_SIDE,
    }
    return [max(weight + preset.offset, 0.0) for weight in curves[preset.name]]


def sai_block_index(path: str, layers_per_block: int) -> int:
    """The SAI (original SDXL) block number of a diffusers down/up-block module: `input_blocks.N` (conv_in is 0,
    then each down block's resnets/attentions and its downsampler) or `output_blocks.N` (each up block's
    layers_per_block + 1 resnets/attentions, its upsampler with the last). SDXL: 3 down blocks -> 1..8."""
    match = _SAI_PART.match(path)
    if match is None:
        raise InputError(f"--unet_block_lr: kohya's presets weigh down and up blocks; {path!r} is in neither.")
    side, block, part, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    if side == "down":
        number = 1 + (layers_per_block + 1) * block + (layers_per_block if part == "downsamplers" else index)
    else:
        number = (layers_per_block + 1) * block + (layers_per_block if part == "upsamplers" else index)
    if number >= SAI_BLOCKS_PER_SIDE:
        raise InputError(
            f"--unet_block_lr: kohya's presets cover SDXL's {SAI_BLOCKS_PER_SIDE} blocks per side; {path!r} is "
            f"block {number} of this UNet. Give its blocks numbers instead."
        )
    return number


def peft_config(args: argparse.Namespace, plan: AdapterPlan) -> PeftConfig:
    """The PEFT config of `--adapter` for the modules of `plan` (full paths, which PEFT matches exactly, or names):
    the flags' rank and alpha, the others as patterns. (IA)³: the modules named in IA3_INPUT_SCALED scale their
    input, the others their output; its vectors start at 1 (the base model)."""
    if args.adapter == "ia3":
        feedforward = [path for path in sorted(plan) if path.endswith(IA3_INPUT_SCALED)]
        return IA3Config(target_modules=sorted(plan), feedforward_modules=feedforward, init_ia3_weights=True)
    ranks = {path: m.rank for path, m in plan.items() if m.rank != args.rank}
    alphas = {path: m.alpha for path, m in plan.items() if m.alpha != args.lora_alpha}
    common = dict(target_modules=sorted(plan), rank_pattern=ranks, alpha_pattern=alphas, r=args.rank)
    if args.adapter in ("lora", "dylora"):  # DyLoRA's layers are LoRA's; `dylora.py` truncates them per step
        return LoraConfig(
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            use_dora=args.use_dora,
            init_lora_weights="gaussian",
            **common,
        )
    lycoris = dict(
        alpha=args.lora_alpha,
        rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
        use_effective_conv2d=args.use_effective_conv2d,
        **common,
    )
    if args.adapter == "loha":
        return LoHaConfig(**lycoris)
    return LoKrConfig(decompose_both=args.decompose_both, decompose_factor=args.lokr_factor, **lycoris)


def add_adapters(parts, args: argparse.Namespace) -> AdapterPlan:
    """Attach the trainable adapters (UNet; text encoders with --train_text_encoder); return the UNet's plan.
    With --network_weights, the parts the file adapts get its adapters and weights instead of the flags'."""
    loaded = load_network_weights(parts, Path(args.network_weights)) if args.network_weights else set()
    if "unet" in loaded:
        plan = loaded_unet_plan(parts.unet, args)
    else:
        plan = unet_adapter_plan(parts.unet, args)
        parts.unet.add_adapter(peft_config(args, plan))
    if args.train_text_encoder:
        # The text encoders' modules by name (the attention projections; (IA)³'s own): PEFT matches them in either
        # transformers layout (with or without the `text_model.` level), so the files load in either.
        if args.adapter == "ia3":
            text_plan = {name: ModuleAdapter(None, None) for name in IA3_TEXT_ENCODER_TARGETS}
        else:
            text_plan = {
                name: ModuleAdapter(args.rank, args.lora_alpha) for name in TEXT_ENCODER_ATTENTION_PROJECTIONS
            }
        for part in ("text_encoder", "text_encoder_2"):
            if part not in loaded:
                getattr(parts, part).add_adapter(peft_config(args, text_plan))
    return plan


def load_network_weights(parts, path: Path) -> set[str]:
    """--network_weights: attach the adapters of a LoRA file (diffusers or kohya; ours or another trainer's) with
    the family, ranks, alphas and targets the file has, holding its weights; return the parts it adapts."""
    from peft import set_peft_model_state_dict

    from .formats.families import live_peft
    from .formats.load import peft_loras, read_safetensors

    models = {part: getattr(parts, part) for part in ("unet", "text_encoder", "text_encoder_2")}
    state, metadata = read_safetensors(path)
    try:
        loras = peft_loras(state, metadata, models)
    except ValueError as error:
        raise InputError(f"--network_weights {path}: {error}") from None
    for part, lora in loras.items():
        model = models[part]
        model.add_adapter(lora.config)
        set_peft_model_state_dict(model, lora.state)
        live = live_peft(model).state
        if live.keys() != lora.state.keys() or any(not torch.equal(live[k], v) for k, v in lora.state.items()):
            raise InputError(f"--network_weights {path}: its {part} adapters do not fit this model's modules.")
    return set(loras)


def loaded_unet_plan(unet: torch.nn.Module, args: argparse.Namespace) -> AdapterPlan:
    """The plan of the UNet's adapters as --network_weights attached them, with --unet_block_lr's scales (a block
    at learning rate 0 keeps the file's weights)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {
        path: m
        for path, m in unet.named_modules()
        if isinstance(m, BaseTunerLayer) and (isinstance(m, IA3Layer) or m.r)
    }
    lr_scales = _block_values(args.unet_block_lr, "--unet_block_lr", list(layers), unet.config.layers_per_block)
    plan = {}
    for path, layer in layers.items():
        if isinstance(layer, IA3Layer):
            plan[path] = ModuleAdapter(None, None, lr_scales(path, 1.0))
            continue
        rank = layer.r["default"]
        plan[path] = ModuleAdapter(rank, layer.scaling["default"] * rank, lr_scales(path, 1.0))
    return plan


def unet_parameters_by_lr_scale(unet: torch.nn.Module, plan: AdapterPlan) -> dict[float, list[torch.nn.Parameter]]:
    """The UNet's trainable adapter parameters grouped by their module's learning-rate scale."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for path, module in plan.items():
        params = [p for p in unet.get_submodule(path).parameters() if p.requires_grad]
        groups.setdefault(module.lr_scale, []).extend(params)
    return groups

"""Command-line flags and every check on them that needs no model.

The flags are those of diffusers' advanced SDXL DreamBooth LoRA script, with the same names, defaults and
meaning, plus a few of ours (marked "ours" in their help). `validate_args` runs before anything is loaded,
so a bad command line fails in a second with a message that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .class_images import validate_prior_flags
from .config import datasets_flag, effective_config, print_config_and_exit, validate_datasets, with_config_file
from .errors import InputError

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
ADAPTERS = ("lora", "dylora", "loha", "lokr", "ia3")
LORA_TARGETS = ("attn", "attn_ff", "all_linear")
# kohya's --max_token_length: captions in one, two or three 75-token chunks (see prompts.py).
MAX_TOKEN_LENGTHS = (75, 150, 225)
# --quantize_unet: how the frozen UNet's Linear weights are stored (quantization.py).
QUANTIZATIONS = ("no", "int8", "fp8")
# Short names of the UNet's block groups in the per-block flags.
BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
# Resize filters, named as torchvision's InterpolationMode (what the reference accepts).
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Markers of an earlier run's results; a folder holding one is not reused without resume or overwrite.
OUTPUT_MARKERS = ("pytorch_lora_weights.safetensors",)
# A negative number, including the exponent forms (-1e-4) that argparse would take for a flag.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
# Optional packages: (module, the flags that need it, how to get it).
OPTIONAL_PACKAGES = {
    "bitsandbytes": ("--use_8bit_adam", "pip install bitsandbytes (it needs a CUDA GPU), or drop --use_8bit_adam"),
    "prodigyopt": ("--optimizer prodigy", "pip install prodigyopt, or use --optimizer adamw"),
    "torchao": ("--quantize_unet", "pip install torchao, or drop --quantize_unet"),
    "xformers": (
        "--enable_xformers_memory_efficient_attention",
        "pip install xformers, or drop the flag (PyTorch's own attention is memory-efficient too)",
    ),
}


def str_to_bool(value: str | bool) -> bool:
    """Parse a boolean flag value: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def _add_bool(parser: argparse._ActionsContainer, flag: str, default: bool, help: str) -> None:
    """A boolean flag usable as `--flag`, `--flag False`, `--flag=true` or `--flag 0`."""
    parser.add_argument(flag, type=str_to_bool, nargs="?", const=True, default=default, help=help)


def long_prompts(max_token_length: int | None) -> bool:
    """--max_token_length 150 or 225: prompts in several chunks, which diffusers' pipeline cannot encode itself
    (the default and 75 are its 77-token truncation)."""
    return max_token_length is not None and max_token_length > MAX_TOKEN_LENGTHS[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SDXL DreamBooth LoRA training with pivotal tuning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local folder of an SDXL pipeline")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="replacement VAE, e.g. an fp16-safe one")
    g.add_argument("--revision", default=None, help="Hub revision of the model")
    g.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    g.add_argument("--cache_dir", default=None, help="where Hub downloads are cached")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub dataset id or local ImageFolder path (images + captions)")
    g.add_argument("--dataset_config_name", default=None, help="dataset configuration name")
    g.add_argument("--instance_data_dir", default=None, help="plain folder of instance images")
    g.add_argument("--image_column", default="image", help="image column of the dataset")
    g.add_argument(
        "--caption_column", default=None, help="caption column; without it every image uses --instance_prompt"
    )
    g.add_argument("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch")
    g.add_argument("--instance_prompt", required=True, help='prompt for instance images, e.g. "a photo of TOK dog"')
    g.add_argument("--class_prompt", default=None, help="prompt for class images (prior preservation)")
    g.add_argument("--class_data_dir", default=None, help="folder of class images")
    g.add_argument("--num_class_images", type=int, default=100, help="minimum number of class images")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class-image generation")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"])
    g.add_argument("--resolution", type=int, default=1024, help="training resolution (multiple of 8)")
    _add_bool(g, "--center_crop", False, "center crop instead of a random crop")
    _add_bool(g, "--random_flip", False, "random horizontal flip")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES, help="resize filter")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loader worker processes")
    _add_bool(g, "--aspect_ratio_bucketing", False, "(ours) train each image at a size close to its aspect ratio")
    g.add_argument(
        "--bucket_min_side", type=int, default=None, help="(ours) smallest bucket side; default resolution/2"
    )
    g.add_argument(
        "--bucket_max_side", type=int, default=None, help="(ours) largest bucket side; default resolution*2"
    )
    g.add_argument("--bucket_step", type=int, default=64, help="(ours) bucket sides are multiples of this")
    _add_bool(g, "--bucket_upscale", False, "(ours) let images smaller than their bucket be upscaled")
    g.add_argument(
        "--caption_extension",
        default=".txt",
        help="(ours) --instance_data_dir: the caption of photo.jpg is read from photo<ext> if it exists",
    )
    _add_bool(g, "--shuffle_caption", False, "(ours) shuffle the comma-separated tags of each caption")
    g.add_argument("--keep_tokens", type=int, default=0, help="(ours) with --shuffle_caption, keep the first N tags")
    g.add_argument(
        "--caption_dropout", type=float, default=0.0, help="(ours) probability of training a sample with no caption"
    )
    g.add_argument(
        "--datasets",
        type=datasets_flag,
        default=None,
        help="(ours) several image folders/datasets, each with its own prompt, repeats, resolution and role "
        "(instance or class images); a list in a --config file (see README), or JSON here",
    )
    _add_bool(g, "--cache_latents", False, "encode images once with the VAE before training")
    g.add_argument(
        "--latents_cache_dir",
        default=None,
        help="(ours) with --cache_latents, also keep the latents here on disk for later runs on the same data",
    )

    g = parser.add_argument_group("pivotal tuning / text encoders")
    _add_bool(g, "--train_text_encoder_ti", False, "pivotal tuning: train embeddings of new tokens")
    g.add_argument("--token_abstraction", default="TOK", help="placeholder(s) in prompts, comma-separated")
    g.add_argument("--num_new_tokens_per_abstraction", type=int, default=2, help="new tokens per abstraction")
    g.add_argument(
        "--initializer_token",
        default=None,
        help="(ours) start the new embeddings from this word's embedding instead of random noise",
    )
    g.add_argument(
        "--train_text_encoder_ti_frac", type=float, default=0.5, help="fraction of steps training embeddings"
    )
    _add_bool(g, "--train_text_encoder", False, "LoRA on both text encoders too")
    g.add_argument(
        "--train_text_encoder_frac", type=float, default=1.0, help="fraction of steps training text-encoder LoRA"
    )
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of text-encoder parameters")
    g.add_argument(
        "--adam_weight_decay_text_encoder", type=float, default=None, help="weight decay of text-encoder parameters"
    )
    g.add_argument("--clip_skip", type=int, default=None, help="use the hidden state this many layers before the last")
    g.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=MAX_TOKEN_LENGTHS,
        help="(kohya) encode captions and validation prompts up to 150 or 225 tokens, in 75-token chunks; "
        "default (or 75): truncated at 77 like diffusers",
    )

    g = parser.add_argument_group("LoRA")
    g.add_argument(
        "--adapter", default="lora", choices=ADAPTERS, help="(ours) adapter family: LoRA, DyLoRA, LoHa, LoKr or (IA)³"
    )
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (LoHa/LoKr: their rank)")
    g.add_argument(
        "--dylora_unit",
        type=int,
        default=None,
        help="(ours) --adapter dylora: train the ranks unit, 2 x unit, ..., --rank at once; default 1 (kohya's)",
    )
    g.add_argument("--lora_alpha", type=float, default=None, help="(ours) alpha (scale alpha/rank); default: the rank")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    _add_bool(g, "--use_dora", False, "DoRA (weight-decomposed LoRA)")
    g.add_argument(
        "--lora_target",
        default="attn",
        choices=LORA_TARGETS,
        help="(ours) UNet layers to adapt: attention projections; + feed-forward; every Linear of the blocks",
    )
    g.add_argument(
        "--lora_target_regex",
        default=None,
        help="(ours) regex over UNet module paths (whole match); replaces the preset",
    )
    g.add_argument("--conv_rank", type=int, default=0, help="(ours) also adapt the UNet's convolutions at this rank")
    g.add_argument("--conv_alpha", type=float, default=None, help="(ours) alpha of convolutions; default: conv_rank")
    g.add_argument(
        "--lora_unet_blocks", default=None, help="comma-separated UNet blocks, e.g. unet.up_blocks.0.attentions.0"
    )
    _add_bool(g, "--use_blora", False, "B-LoRA: adapt only up_blocks.0.attentions.0 and .1")
    g.add_argument(
        "--unet_block_ranks", default=None, help="(ours) per-block ranks, e.g. 'down=2,mid=4,up_blocks.0=16'; 0: none"
    )
    g.add_argument("--unet_block_conv_ranks", default=None, help="(ours) per-block convolution ranks, same syntax")
    g.add_argument(
        "--unet_block_lr",
        default=None,
        help="(ours) per-block learning-rate multipliers, e.g. 'down=0.5'; down/up also take kohya's presets "
        "sine, cosine, linear, reverse_linear, zeros (+offset), e.g. 'down=sine,up=cosine+0.5'",
    )
    g.add_argument("--rank_dropout", type=float, default=0.0, help="(ours) LoHa/LoKr: dropout over the rank")
    g.add_argument("--module_dropout", type=float, default=0.0, help="(ours) LoHa/LoKr: dropout of whole modules")
    _add_bool(g, "--use_effective_conv2d", False, "(ours) LoHa/LoKr: Tucker (CP) decomposition of 3x3 convolutions")
    g.add_argument(
        "--lokr_factor", type=int, default=-1, help="(ours) LoKr: Kronecker factor; -1: near the square root"
    )
    _add_bool(g, "--decompose_both", False, "(ours) LoKr: low-rank left factor too")

    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--optimizer", default="AdamW", type=str.lower, choices=["adamw", "prodigy"], help="AdamW or Prodigy"
    )
    _add_bool(g, "--use_8bit_adam", False, "bitsandbytes 8-bit AdamW")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="UNet learning rate (about 1.0 for Prodigy)")
    _add_bool(g, "--scale_lr", False, "scale the learning rate by processes x accumulation x batch size")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_step_rules", default=None, help='(ours) piecewise_constant rules, e.g. "1:10,0.1:20,0.01"')
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--adam_weight_decay", type=float, default=1e-04)
    g.add_argument("--prodigy_beta3", type=float, default=None, help="Prodigy beta3; default sqrt(beta2)")
    _add_bool(g, "--prodigy_decouple", True, "Prodigy: decoupled weight decay")
    _add_bool(g, "--prodigy_use_bias_correction", True, "Prodigy: bias correction")
    _add_bool(g, "--prodigy_safeguard_warmup", True, "Prodigy: safeguard warmup")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    _add_bool(g, "--gradient_checkpointing", False, "trade compute for memory")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides epochs")
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (5.0 recommended)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="offset-noise strength")
    g.add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="(ours) training target; default: the model scheduler's",
    )
    _add_bool(g, "--do_edm_style_training", False, "EDM-style preconditioning and loss")
    _add_bool(g, "--with_prior_preservation", False, "add the class-image loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    _add_bool(g, "--allow_tf32", False, "TF32 matmuls on Ampere and newer GPUs")
    _add_bool(g, "--enable_xformers_memory_efficient_attention", False, "xformers attention")
    g.add_argument("--seed", type=int, default=None, help="seed; a run without one picks one and records it")

    g = parser.add_argument_group("checkpoints, validation, logging, hub")
    g.add_argument("--output_dir", default="lora-dreambooth-model")
    _add_bool(g, "--overwrite_output_dir", False, "(ours) allow replacing the results of an earlier run")
    _add_bool(
        g,
        "--bundle_embeddings",
        True,
        "(ours) with pivotal tuning, bundle the embeddings into the kohya file (A1111 bundle_emb)",
    )
    _add_bool(
        g,
        "--output_kohya_format",
        True,
        "(from diffusers' plain SDXL LoRA script) the kohya file for AUTOMATIC1111 / ComfyUI is always written",
    )
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save the training state every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=50, help="validate every N epochs")
    g.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="(ours) validate every N optimizer steps instead of every --validation_epochs epochs",
    )
    g.add_argument(
        "--validation_inference_steps", type=int, default=25, help="(ours) denoising steps of validation images"
    )
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    _add_bool(g, "--push_to_hub", False, "upload the output folder")
    g.add_argument("--hub_token", default=None, help="Hub token (never printed or logged)")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")

    _add_kohya_flags(parser)

    g = parser.add_argument_group("speed (ours)")
    _add_bool(g, "--adam_fused", False, "(ours) torch's fused AdamW kernel (one kernel per step; not with 8-bit Adam)")
    _add_bool(g, "--channels_last", False, "(ours) UNet in channels-last memory format (faster convolutions on GPUs)")
    _add_bool(g, "--compile", False, "(ours) torch.compile the UNet's transformer blocks (regional compilation)")
    g.add_argument(
        "--quantize_unet",
        default="no",
        choices=QUANTIZATIONS,
        help="(ours) store the frozen UNet's Linear weights in int8 or fp8 (torchao weight-only quantisation; "
        "the LoRA stays float32): SDXL's UNet weights take 2.9 GB instead of 5.1 GB (bf16)",
    )
    _add_bool(
        g,
        "--memory_plan",
        True,
        "(ours) on CUDA, log the planner's peak-memory estimate before loading (warns when it will not fit)",
    )

    g = parser.add_argument_group("config file")
    g.add_argument("--config", default=None, help="(ours) YAML, TOML or JSON file of flags; the command line wins")
    _add_bool(g, "--print_config", False, "(ours) print the effective configuration (YAML) and exit")
    return parser


def _add_kohya_flags(parser: argparse.ArgumentParser) -> None:
    """Options named as in kohya's sd-scripts, for its users; checked by `_validate_kohya_flags` below."""
    g = parser.add_argument_group("kohya's sd-scripts options")
    g.add_argument(
        "--save_every_n_epochs",
        type=int,
        default=None,
        help="(kohya) also save a checkpoint at the end of every N-th epoch, beside --checkpointing_steps",
    )
    g.add_argument(
        "--save_last_n_epochs",
        type=int,
        default=None,
        help="(kohya) with --save_every_n_epochs, keep the checkpoints of the last N epoch saves only",
    )

    g.add_argument(
        "--network_weights",
        default=None,
        help="(kohya) start from this LoRA file (diffusers or kohya format, any trainer's): its family, ranks "
        "and targets replace --adapter/--rank/--lora_target for the parts it adapts, and training continues it",
    )

    g.add_argument(
        "--sample_prompts",
        default=None,
        help="(kohya) text file of sample prompts, one a line, with kohya's options --n --w --h --s --l --d",
    )
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="(kohya) sample every N optimizer steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="(kohya) sample every N epochs")


# Flags that shape the UNet's adapters, and also the text encoders' (--network_weights replaces them).
UNET_SHAPE_FLAGS = (
    "lora_target",
    "lora_target_regex",
    "conv_rank",
    "conv_alpha",
    "lora_unet_blocks",
    "use_blora",
    "unet_block_ranks",
    "unet_block_conv_ranks",
)
NETWORK_WEIGHTS_IGNORES = (
    "adapter",
    "rank",
    "lora_alpha",
    "use_dora",
    "lokr_factor",
    "decompose_both",
    *UNET_SHAPE_FLAGS,
)


def _validate_kohya_flags(args: argparse.Namespace) -> None:
    for flag in ("save_every_n_epochs", "save_last_n_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1, got {value}.")
    if args.save_last_n_epochs is not None and args.save_every_n_epochs is None:
        raise InputError("--save_last_n_epochs needs --save_every_n_epochs (how often an epoch is saved).")
    if args.network_weights is not None:
        _validate_network_weights(args)
    for flag in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1, got {value}.")
        if value is not None and args.sample_prompts is None:
            raise InputError(f"--{flag} needs --sample_prompts FILE (the prompts to sample).")
    if args.sample_every_n_steps is not None and args.sample_every_n_epochs is not None:
        raise InputError("Pass --sample_every_n_steps or --sample_every_n_epochs, not both.")
    if args.sample_prompts is not None:
        from .sample_prompts import read_sample_prompts

        read_sample_prompts(args.sample_prompts)  # a bad line fails now, named


def _validate_network_weights(args: argparse.Namespace) -> None:
    """The file is a LoRA of ours or another trainer's (read from its keys only), and its text-encoder adapters,
    if any, will be trained."""
    from safetensors import SafetensorError

    from .formats.load import lora_file_parts

    path = Path(args.network_weights)
    if not path.is_file() or path.suffix != ".safetensors":
        raise InputError(f"--network_weights {path}: pass an existing LoRA .safetensors file (diffusers or kohya).")
    try:
        parts = lora_file_parts(path)
    except ValueError as error:
        raise InputError(f"--network_weights: {error} Pass a LoRA file (diffusers or kohya format).") from None
    except (OSError, SafetensorError) as error:
        raise InputError(f"--network_weights {path} is not a readable safetensors file ({error}).") from None
    if parts - {"unet"} and not args.train_text_encoder:
        raise InputError(
            f"--network_weights {path} adapts the text encoders too: pass --train_text_encoder to continue them "
            "(without --train_text_encoder_ti), or use a file with UNet adapters only."
        )
    # The file decides the adapters of the parts it adapts; the flags still shape encoders it lacks.
    shaping = NETWORK_WEIGHTS_IGNORES if parts >= {"unet", "text_encoder", "text_encoder_2"} else UNET_SHAPE_FLAGS
    defaults = build_parser()
    ignored = [f"--{flag}" for flag in shaping if getattr(args, flag) != defaults.get_default(flag)]
    if "unet" in parts and ignored:
        warnings.warn(
            f"--network_weights {path} decides the adapters' family, ranks and targets: {', '.join(ignored)} "
            "have no effect on the parts it adapts.",
            stacklevel=2,
        )


def join_negative_values(argv: list[str]) -> list[str]:
    """`["--learning_rate", "-1e-4"]` -> `["--learning_rate=-1e-4"]`: argparse reads "-1e-4" as an unknown
    flag, so a negative value in exponent form reaches the flag's own check only when joined to it."""
    joined: list[str] = []
    for token in argv:
        if joined and NEGATIVE_NUMBER.match(token) and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(with_config_file(parser, argv)))
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    validate_args(args)
    # The flags as given, before the derived defaults below: what --config reads back to this same run.
    args.effective_config = effective_config(parser, args)
    if args.print_config:
        print_config_and_exit(args.effective_config)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)  # the reference's choice: scale 1
    if args.conv_alpha is None:
        args.conv_alpha = float(args.conv_rank)
    if args.adapter == "dylora" and args.dylora_unit is None:
        args.dylora_unit = 1  # kohya's default: every rank from 1 to --rank
    step = args.bucket_step
    if args.bucket_min_side is None:
        args.bucket_min_side = max(step, args.resolution // 2 // step * step)
    if args.bucket_max_side is None:
        args.bucket_max_side = args.resolution * 2 // step * step
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad or contradictory flags before any model or data is loaded. Raises ValueError."""
    # Contradictions first: they are the real problem whatever else is wrong.
    if args.use_blora and args.lora_unet_blocks:
        raise InputError("--use_blora fixes the UNet blocks itself; do not also pass --lora_unet_blocks.")
    if args.train_text_encoder and args.train_text_encoder_ti:
        raise InputError(
            "Use either --train_text_encoder (LoRA) or --train_text_encoder_ti (pivotal tuning), not both."
        )
    if args.do_edm_style_training and args.snr_gamma is not None:
        raise InputError(
            "--snr_gamma weights the DDPM objective; EDM-style training weights its loss by 1/sigma^2 itself. "
            "Drop one of --snr_gamma and --do_edm_style_training."
        )

    _validate_data_source(args)
    _validate_output_dir(args)
    validate_prior_flags(args)

    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise InputError(
            "--resume_from_checkpoint continues the earlier run and --overwrite_output_dir replaces it: pass one."
        )
    if args.hub_token and args.report_to in ("wandb", "all"):
        raise InputError(
            "--hub_token with --report_to wandb would expose the token (wandb records the command line). "
            "Log in with `huggingface-cli login` or set HF_TOKEN instead of passing --hub_token."
        )
    if args.resolution <= 0 or args.resolution % 8:
        raise InputError(f"--resolution must be a positive multiple of 8 (the VAE's scale), got {args.resolution}.")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        # numpy's and the data order's seeding need a non-negative 32-bit seed; a bad one would only fail
        # at the first training step, after the models have loaded.
        raise InputError(f"--seed must be in [0, 2**32 - 1], got {args.seed}.")
    for flag in ("rank", "repeats", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise InputError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    for flag in ("num_validation_images", "validation_epochs", "validation_inference_steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.validation_steps is not None and args.validation_steps < 1:
        raise InputError(f"--validation_steps must be at least 1, got {args.validation_steps}.")
    if args.checkpointing_steps < 1:
        raise InputError(f"--checkpointing_steps must be at least 1, got {args.checkpointing_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise InputError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")
    if args.train_text_encoder_ti:
        _validate_pivotal_flags(args)
    for flag in ("train_text_encoder_frac", "train_text_encoder_ti_frac"):
        if not 0.0 < getattr(args, flag) <= 1.0:
            raise InputError(f"--{flag} must be in (0, 1], got {getattr(args, flag)}.")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise InputError(f"--snr_gamma must be positive (5.0 is the usual value), got {args.snr_gamma}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise InputError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise InputError(f"--clip_skip must be 0 or more, got {args.clip_skip}.")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        raise InputError(f"--caption_extension must look like .txt or .caption, got {args.caption_extension!r}.")
    if args.bucket_step < 8 or args.bucket_step % 8:
        raise InputError(f"--bucket_step must be a positive multiple of 8 (the VAE's scale), got {args.bucket_step}.")
    for flag in ("bucket_min_side", "bucket_max_side"):
        value = getattr(args, flag)
        if value is not None and (value < args.bucket_step or value % args.bucket_step):
            raise InputError(f"--{flag} must be a positive multiple of --bucket_step {args.bucket_step}, got {value}.")
    if args.bucket_min_side and args.bucket_max_side and args.bucket_min_side > args.bucket_max_side:
        raise InputError("--bucket_min_side is larger than --bucket_max_side.")
    if args.keep_tokens < 0:
        raise InputError(f"--keep_tokens must be 0 or more, got {args.keep_tokens}.")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise InputError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}.")
    if args.dataloader_num_workers < 0:
        raise InputError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}.")
    if args.learning_rate <= 0:
        raise InputError(
            f"--learning_rate must be positive (1e-4 is usual; about 1.0 for Prodigy), got {args.learning_rate}."
        )
    if args.text_encoder_lr < 0:
        raise InputError(f"--text_encoder_lr must be 0 or more (5e-6 is the default), got {args.text_encoder_lr}.")
    _validate_adapter_flags(args)
    _validate_kohya_flags(args)
    _validate_packages(args)

    if not args.output_kohya_format:
        warnings.warn("--output_kohya_format False has no effect: the kohya file is always written.", stacklevel=2)
    if args.optimizer == "prodigy" and args.use_8bit_adam:
        warnings.warn("--use_8bit_adam has no effect with --optimizer prodigy.", stacklevel=2)
    if args.optimizer == "prodigy" and args.learning_rate <= 0.1:
        warnings.warn(
            f"Prodigy adapts the step size itself; --learning_rate is a multiplier, usually 1.0 "
            f"(got {args.learning_rate}).",
            stacklevel=2,
        )
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt):
        warnings.warn("--class_data_dir/--class_prompt are ignored without --with_prior_preservation.", stacklevel=2)


def _validate_packages(args: argparse.Namespace) -> None:
    """The optional packages the flags need are installed (looked up, not imported: that takes seconds)."""
    needed = {
        "bitsandbytes": args.use_8bit_adam and args.optimizer != "prodigy",
        "prodigyopt": args.optimizer == "prodigy",
        "torchao": args.quantize_unet != "no",
        "xformers": args.enable_xformers_memory_efficient_attention,
    }
    for module, wanted in needed.items():
        if wanted and importlib.util.find_spec(module) is None:
            flag, fix = OPTIONAL_PACKAGES[module]
            raise InputError(f"{flag} needs the {module} package, which is not installed: {fix}.")


# Flags that shape low-rank adapters and have no meaning for (IA)³'s scaling vectors: {flag: why}.
IA3_INAPPLICABLE = {
    "rank": "has no rank",
    "lora_alpha": "has no alpha",
    "lora_dropout": "has no dropout",
    "lora_target": "adapts its own modules (to_k, to_v, ff.net.2); choose blocks with --lora_unet_blocks",
    "lora_target_regex": "adapts its own modules (to_k, to_v, ff.net.2); choose blocks with --lora_unet_blocks",
    "conv_rank": "adapts no convolutions",
    "conv_alpha": "adapts no convolutions",
    "unet_block_ranks": "has no rank; choose blocks with --lora_unet_blocks",
    "unet_block_conv_ranks": "adapts no convolutions",
}


def _validate_adapter_flags(args: argparse.Namespace) -> None:
    if args.adapter == "ia3":
        defaults = build_parser()
        for flag, why in IA3_INAPPLICABLE.items():
            if getattr(args, flag) != defaults.get_default(flag):
                raise InputError(f"--{flag} does not apply to --adapter ia3: (IA)³ {why}. Drop --{flag}.")
    lycoris = args.adapter in ("loha", "lokr")
    if args.adapter == "dylora" or args.dylora_unit is not None:
        _validate_dylora_flags(args)
    if args.use_dora and args.adapter != "lora":
        raise InputError(
            f"--use_dora is a LoRA variant; drop it or use --adapter lora (got --adapter {args.adapter})."
        )
    if args.lora_dropout and lycoris:
        raise InputError("--lora_dropout is LoRA's; LoHa and LoKr use --rank_dropout and --module_dropout.")
    for flag in ("rank_dropout", "module_dropout"):
        value = getattr(args, flag)
        if value and not lycoris:
            raise InputError(f"--{flag} is for --adapter loha or lokr; LoRA uses --lora_dropout.")
        if not 0.0 <= value < 1.0:
            raise InputError(f"--{flag} must be in [0, 1), got {value}.")
    if args.use_effective_conv2d and not lycoris:
        raise InputError("--use_effective_conv2d is for --adapter loha or lokr.")
    if (args.decompose_both or args.lokr_factor != -1) and args.adapter != "lokr":
        raise InputError("--lokr_factor and --decompose_both are for --adapter lokr.")
    if args.lokr_factor == 0 or args.lokr_factor < -1:
        raise InputError(f"--lokr_factor must be -1 (automatic) or a positive factor, got {args.lokr_factor}.")
    if args.conv_rank < 0:
        raise InputError(f"--conv_rank must be 0 (no convolutions) or more, got {args.conv_rank}.")
    if args.conv_alpha is not None and not args.conv_rank:
        raise InputError("--conv_alpha needs --conv_rank (the rank of the convolutions' adapters).")
    if args.unet_block_conv_ranks and not args.conv_rank:
        raise InputError("--unet_block_conv_ranks needs --conv_rank (the default rank of convolutions).")
    if args.lora_target_regex is not None:
        if args.lora_target != "attn":
            raise InputError("Use --lora_target or --lora_target_regex, not both.")
        try:
            re.compile(args.lora_target_regex)
        except re.error as error:
            raise InputError(f"--lora_target_regex {args.lora_target_regex!r} is not a regex: {error}.") from None
    if args.lora_unet_blocks is not None:
        parse_unet_blocks(args.lora_unet_blocks)
    for flag in ("unet_block_ranks", "unet_block_conv_ranks", "unet_block_lr"):
        spec = getattr(args, flag)
        if spec is not None:
            values = parse_block_values(spec, f"--{flag}", presets=flag == "unet_block_lr")
            if flag != "unet_block_lr" and any(v != int(v) for v in values.values()):
                raise InputError(f"--{flag}: ranks are whole numbers, got {spec!r}.")


def _validate_dylora_flags(args: argparse.Namespace) -> None:
    """DyLoRA nests plain LoRA ranks: every rank a multiple of --dylora_unit, nothing that ties the adapters to
    one rank (DoRA's magnitudes, a LoRA file's ranks, text encoders frozen at one truncation)."""
    if args.adapter != "dylora":
        raise InputError(f"--dylora_unit is for --adapter dylora (got --adapter {args.adapter}); drop it or add that.")
    unit = 1 if args.dylora_unit is None else args.dylora_unit
    if unit < 1:
        raise InputError(f"--dylora_unit must be at least 1 (the step between trained ranks), got {unit}.")
    ranks = {"--rank": [args.rank], "--conv_rank": [args.conv_rank] if args.conv_rank else []}
    for flag in ("unet_block_ranks", "unet_block_conv_ranks"):
        spec = getattr(args, flag)
        ranks[f"--{flag}"] = [int(v) for v in parse_block_values(spec, f"--{flag}").values() if v] if spec else []
    for flag, values in ranks.items():
        for rank in values:
            if rank % unit:
                lower, higher = rank // unit * unit, (rank // unit + 1) * unit
                fix = f"{lower} or {higher}" if lower else str(higher)
                raise InputError(
                    f"{flag} {rank} is not a multiple of --dylora_unit {unit}: DyLoRA trains the ranks {unit}, "
                    f"{2 * unit}, ... Use {fix} there, or a --dylora_unit that divides it."
                )
    if args.use_dora:
        raise InputError(
            "--use_dora with --adapter dylora: DoRA's magnitudes are trained for one rank, not for each "
            "truncation; drop --use_dora, or use --adapter lora --use_dora."
        )
    if args.network_weights is not None:
        raise InputError(
            "--network_weights continues a LoRA file at its own ranks; --adapter dylora trains nested ranks from "
            "the start. Drop one of them."
        )
    if args.train_text_encoder and args.train_text_encoder_frac < 1.0:
        raise InputError(
            "--adapter dylora with --train_text_encoder trains the text encoders' ranks together with the UNet's; "
            "--train_text_encoder_frac below 1 would freeze them at one rank. Drop --train_text_encoder_frac."
        )


def _validate_pivotal_flags(args: argparse.Namespace) -> None:
    abstractions = [a.strip() for a in args.token_abstraction.split(",")]
    if not all(abstractions):
        raise InputError(
            f"--token_abstraction {args.token_abstraction!r} has an empty entry; use e.g. TOK or TOK,SKS."
        )
    if len(set(abstractions)) != len(abstractions):
        raise InputError(f"--token_abstraction {args.token_abstraction!r} names an abstraction twice.")
    for a in abstractions:
        if any(a != b and a in b for b in abstractions):
            raise InputError(f"--token_abstraction: {a!r} is part of another abstraction; choose distinct words.")
    if args.num_new_tokens_per_abstraction < 1:
        raise InputError(
            f"--num_new_tokens_per_abstraction must be at least 1, got {args.num_new_tokens_per_abstraction}."
        )


def _validate_data_source(args: argparse.Namespace) -> None:
    if args.datasets:
        validate_datasets(args)
        return
    if args.dataset_name and args.instance_data_dir:
        raise InputError("Pass either --dataset_name or --instance_data_dir, not both.")
    if not args.dataset_name and not args.instance_data_dir:
        raise InputError("No training images: pass --instance_data_dir FOLDER or --dataset_name NAME_OR_FOLDER.")
    if args.instance_data_dir:
        folder = Path(args.instance_data_dir)
        if not folder.exists():
            raise InputError(f"--instance_data_dir {folder} does not exist.")
        if not folder.is_dir():
            raise InputError(f"--instance_data_dir {folder} is a file; pass the folder that holds the images.")
    if args.caption_column and not args.dataset_name:
        raise InputError("--caption_column applies to --dataset_name; a plain --instance_data_dir has no columns.")


def _validate_output_dir(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir {out} is a file; pass a folder path.")
    blocking = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"--output_dir {out} cannot be created: {blocking} is a file. Pass another folder path.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_absolute() and not checkpoint.exists():
            checkpoint = out / checkpoint
        if not checkpoint.is_dir():
            raise InputError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")
    if args.resume_from_checkpoint or args.overwrite_output_dir or not out.is_dir():
        return
    earlier = [name for name in OUTPUT_MARKERS if (out / name).exists()]
    earlier += sorted(p.name for p in out.glob("checkpoint-*"))
    if earlier:
        raise InputError(
            f"--output_dir {out} holds an earlier run ({', '.join(earlier[:3])}). Pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
        )


# kohya's presets of --down_lr_weight / --up_lr_weight (networks/lora.py), each with an optional +offset.
BLOCK_LR_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_BLOCK_LR_PRESET_PATTERN = re.compile(r"^(" + "|".join(BLOCK_LR_PRESETS) + r")(?:\+(\d+\.?\d*|\.\d+))?$")
_BLOCK_PATTERN = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(\.(attentions|resnets)\.\d+)?$")


def parse_unet_blocks(spec: str) -> list[str]:
    """`"unet.up_blocks.0.attentions.0, up_blocks.1"` -> `["up_blocks.0.attentions.0", "up_blocks.1"]`."""
    blocks = []
    for item in "".join(spec.split()).split(","):
        name = item.removeprefix("unet.")
        if not _BLOCK_PATTERN.match(name):
            raise InputError(
                f"--lora_unet_blocks: {item!r} is not a UNet block; use names such as unet.down_blocks.2, "
                "unet.mid_block.attentions.0 or unet.up_blocks.0.attentions.1."
            )
        blocks.append(name)
    return blocks


def parse_block_values(spec: str, flag: str, presets: bool = False) -> dict[str, float | BlockLrPreset]:
    """`"down=2, mid=4, up_blocks.0.attentions.1=16"` -> {"down_blocks": 2.0, "mid_block": 4.0, ...}.

    A key is a group (down, mid, up) or a block as --lora_unet_blocks names it; values are non-negative numbers.
    With `presets` (--unet_block_lr), down and up also take one of kohya's weight presets (`down=sine+0.5`)."""
    values: dict[str, float | BlockLrPreset] = {}
    for item in "".join(spec.split()).split(","):
        key, _, value = item.partition("=")
        block = BLOCK_ALIASES.get(key, key.removeprefix("unet."))
        if not (block in BLOCK_ALIASES.values() or _BLOCK_PATTERN.match(block)):
            raise InputError(
                f"{flag}: {key!r} is not a UNet block; use down, mid, up or names such as down_blocks.1 or "
                "up_blocks.0.attentions.1 (as in 'down=2,up_blocks.0=16')."
            )
        preset = parse_block_lr_preset(value) if presets else None
        if preset is not None:
            if block not in ("down_blocks", "up_blocks") or block in values:
                raise InputError(
                    f"{flag}: {item!r}: kohya's presets ({', '.join(BLOCK_LR_PRESETS)}) weigh the down or up "
                    "blocks, as in 'down=sine,up=cosine+0.5'; give mid and single blocks a number."
                )
            values[block] = preset
            continue
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if number < 0 or block in values:
            hint = f", or for down/up one of {', '.join(BLOCK_LR_PRESETS)} (+offset)" if presets else ""
            raise InputError(f"{flag}: {item!r} needs one non-negative number per block{hint}, as in 'down=2,up=8'.")
        values[block] = number
    return values


@dataclass(frozen=True)
class BlockLrPreset:
    """kohya's `down_lr_weight` / `up_lr_weight` preset: a curve over the 9 SAI input (or output) blocks of
    SDXL's UNet, plus an offset (`sine+0.5`)."""

    name: str
    offset: float = 0.0


def parse_block_lr_preset(text: str) -> BlockLrPreset | None:
    """`"cosine+0.25"` -> BlockLrPreset("cosine", 0.25); None if `text` names no preset."""
    match = _BLOCK_LR_PRESET_PATTERN.match(text)
    if match is None:
        return None
    return BlockLrPreset(match.group(1), float(match.group(2)) if match.group(2) else 0.0)

#!/usr/bin/env python
"""Seconds per optimizer step: the real trainer against a bare training step of the same models.

    python benchmarks/benchmark_step.py --preset tiny                  # 128 px
    python benchmarks/benchmark_step.py --preset small --steps 5       # 256 px
    python benchmarks/benchmark_step.py --preset tiny -- --use_dora    # extra trainer flags after `--`

It builds an SDXL-architecture pipeline with random weights (`sdxl_pivotal.tiny`) and a demo image set in a
temporary folder, then, in one process, measures two things and prints them with their ratio ("overhead"):

bare
    A minimal training step written here: VAE encode (no grad) and latent sampling, noise, timesteps,
    `add_noise`, UNet forward, MSE loss, backward, gradient clipping (when `--max_grad_norm` > 0, as the
    trainer does), optimizer step, `zero_grad`. The models are those the trainer would use, set up by the
    package's own functions (`load_sdxl`, `add_lora_adapters`, `place_models`, `create_optimizer`; none of
    this is timed): the same UNet with the same LoRA, the same dtypes, the same optimizer. The batch is one
    batch of the trainer's dataset (same pixels, captions and micro-conditioning) reused at every step. The
    text encoders are called as the trainer calls them: once before the loop when they are frozen (the
    trainer caches each caption's embeddings), and at every step, with gradients, with
    `--train_text_encoder`. Mixed precision is `torch.autocast` (plus a GradScaler for fp16), which is
    what accelerate wraps the prepared models in.

trainer
    `sdxl_pivotal.train.train(args)` itself, args from `sdxl_pivotal.args.parse_args`. The trainer updates
    its tqdm progress bar exactly once per optimizer step, after `optimizer.zero_grad()`; this script
    replaces the `tqdm` name that `sdxl_pivotal.train` imported with a subclass whose `update()` records a
    timestamp (after `torch.cuda.synchronize()` on CUDA) and then behaves as tqdm. The time between two
    consecutive updates is therefore one whole iteration of the real loop: data loading and collation,
    RNG setup, the forward/backward, clipping, the optimizer and LR-scheduler steps, the progress bar and
    tracker logging (and a checkpoint, if one fell due; `--checkpointing_steps` is set past the end of the
    run unless passed after `--`). Model loading, the first `--warmup_steps` steps and the final LoRA
    export are outside the timed window. Nothing in the package is edited or re-implemented.

Both phases time `--steps` steps after `--warmup_steps` untimed ones, synchronising the GPU after every
step, and report the mean (total / steps) plus median and range. The bare phase runs first; its models are
freed before the trainer loads its own. Peak memory: on CUDA `torch.cuda.max_memory_allocated()` per phase
(reset in between); on CPU the process's peak resident set size from `resource.getrusage` (a high-water
mark of the whole process so far, so the trainer's figure is at least the bare one's).

Tracker: the trainer's default `--report_to tensorboard` is kept (pass `-- --report_to none` to drop it).
The figures are printed, never asserted. `--profile FILE` also writes a cProfile of the trainer's timed
steps (cProfile slows Python-heavy code, so read it for where the time goes, not for the totals).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sdxl_pivotal.train as train_module  # noqa: E402
from sdxl_pivotal.args import parse_args  # noqa: E402
from sdxl_pivotal.data import DreamBoothDataset, collate, load_records  # noqa: E402
from sdxl_pivotal.models import add_lora_adapters, load_sdxl, place_models, trained_models  # noqa: E402
from sdxl_pivotal.optim import create_optimizer, parameter_groups, trainable_parameters  # noqa: E402
from sdxl_pivotal.prompts import tokenize  # noqa: E402
from sdxl_pivotal.tiny import PRESETS, count_parameters, save_tiny_sdxl, write_demo_images  # noqa: E402

DEFAULT_RESOLUTION = {"tiny": 128, "small": 256}
INSTANCE_PROMPT = "a photo of TOK toy figure"
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the trainer flags given after `--`."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--resolution", type=int, default=None, help="default: 128 for tiny, 256 for small")
    parser.add_argument("--train_batch_size", type=int, default=4, help="the trainer's default")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--num_images", type=int, default=None, help="default: a multiple of the batch size >= 8")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    parser.add_argument("--model_dir", default=None, help="reuse (or create) the pipeline here instead of a temp dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_bare", action="store_true")
    parser.add_argument("--skip_trainer", action="store_true")
    parser.add_argument("--profile", default=None, help="write a cProfile of the trainer's timed steps here")
    options = parser.parse_args(argv)
    if options.resolution is None:
        options.resolution = DEFAULT_RESOLUTION[options.preset]
    if options.steps < 1 or options.warmup_steps < 0:
        parser.error("--steps must be at least 1 and --warmup_steps at least 0")
    if options.num_images is None:
        # Every batch full: the trainer's last batch of an epoch is short when the batch size does not divide it.
        options.num_images = options.train_batch_size * math.ceil(8 / options.train_batch_size)
    return options, extra


def trainer_argv(options: argparse.Namespace, model_dir: Path, images: Path, output_dir: Path, extra: list[str]):
    total = options.warmup_steps + options.steps
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(images),
        "--instance_prompt", INSTANCE_PROMPT,
        "--output_dir", str(output_dir),
        "--resolution", str(options.resolution),
        "--train_batch_size", str(options.train_batch_size),
        "--max_train_steps", str(total),
        "--checkpointing_steps", str(total + 1),
        "--mixed_precision", options.mixed_precision,
        "--rank", str(options.rank),
        "--seed", str(options.seed),
    ]  # fmt: skip
    if options.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if options.train_text_encoder:
        argv.append("--train_text_encoder")
    return argv + extra  # later flags win: anything after `--` overrides the above


# --- measurement helpers -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB (torch.cuda.max_memory_allocated)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    return f"{peak_mib:,.0f} MiB (process peak RSS so far, getrusage)"


def summarize(times: list[float]) -> dict:
    return dict(
        mean=sum(times) / len(times),
        median=statistics.median(times),
        min=min(times),
        max=max(times),
        n=len(times),
    )


def describe(stats: dict) -> str:
    return (
        f"{stats['mean']:.4f} s/step (mean of {stats['n']}; median {stats['median']:.4f}, "
        f"min {stats['min']:.4f}, max {stats['max']:.4f})"
    )


# --- bare step -----------------------------------------------------------------------------------------------


def run_bare(args: argparse.Namespace, options: argparse.Namespace, device: torch.device) -> dict:
    """Set the models up as the trainer does (untimed), then time a minimal training step written here."""
    torch.manual_seed(options.seed)
    parts = load_sdxl(args)
    add_lora_adapters(parts, args)
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
            parts.text_encoder_2.gradient_checkpointing_enable()
    weight_dtype = AUTOCAST_DTYPES.get(args.mixed_precision, torch.float32)
    place_models(parts, device, weight_dtype, vae_fp32=not args.pretrained_vae_model_name_or_path)
    models = trained_models(parts, args)
    unet_params = trainable_parameters(parts.unet)
    text_params = [p for name, m in models.items() if name != "unet" for p in trainable_parameters(m)]
    optimizer = create_optimizer(args, parameter_groups(args, unet_params, text_params))
    params = unet_params + text_params
    for model in models.values():
        model.train()

    dataset = DreamBoothDataset(load_records(args), args, options.seed)
    batch = collate([dataset[(0, i)] for i in range(args.train_batch_size)])
    vae, unet, scheduler = parts.vae, parts.unet, parts.noise_scheduler
    encoders = [parts.text_encoder, parts.text_encoder_2]
    token_ids = [tokenize(t, batch.captions).to(device) for t in (parts.tokenizer, parts.tokenizer_2)]
    layer = -2 if args.clip_skip is None else -(args.clip_skip + 2)

    autocast_dtype = AUTOCAST_DTYPES.get(args.mixed_precision)
    if autocast_dtype is not None:
        autocast = functools.partial(torch.autocast, device.type, dtype=autocast_dtype)
    else:
        autocast = contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None

    def encode_text():
        hidden = []
        for encoder, ids in zip(encoders, token_ids, strict=True):
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[layer])
        return torch.cat(hidden, dim=-1), output[0]

    if not args.train_text_encoder:
        with torch.no_grad():
            frozen_embeds = encode_text()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    def step() -> float:
        # The batch arrives on the CPU, as from any data loader.
        pixels = batch.pixel_values.to(device, dtype=vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            if args.train_text_encoder:
                prompt_embeds, pooled = encode_text()
            else:
                prompt_embeds, pooled = frozen_embeds
            time_ids = batch.time_ids.to(device, dtype=prompt_embeds.dtype)
            prediction = unet(
                noisy,
                timesteps,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma:
            snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
            denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
            loss = loss * snr.clamp(max=args.snr_gamma) / denominator
        loss = loss.mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if args.gradient_accumulation_steps != 1:
        print("  note: the bare step does one micro-batch per step; --gradient_accumulation_steps is ignored")
    times = []
    for i in range(options.warmup_steps + options.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= options.warmup_steps:
            times.append(time.perf_counter() - start)
    result = dict(
        stats=summarize(times),
        memory=peak_memory(device),
        counts=dict(
            unet=count_parameters(parts.unet) - sum(p.numel() for p in unet_params),
            text_encoders=count_parameters(parts.text_encoder) + count_parameters(parts.text_encoder_2),
            vae=count_parameters(parts.vae),
            trainable_unet=sum(p.numel() for p in unet_params),
            trainable_text=sum(p.numel() for p in text_params),
        ),
    )
    return result


# --- the trainer ---------------------------------------------------------------------------------------------


def run_trainer(args: argparse.Namespace, options: argparse.Namespace, device: torch.device) -> dict:
    """Run `train(args)` with a tqdm whose `update()` timestamps every optimizer step."""
    stamps: list[float] = []
    profiler = cProfile.Profile() if options.profile else None
    base_tqdm = train_module.tqdm

    class TimedTqdm(base_tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            synchronize(device)
            stamps.append(time.perf_counter())

        def update(self, n=1):
            synchronize(device)
            stamps.append(time.perf_counter())
            if profiler is not None:
                if len(stamps) == options.warmup_steps + 1:
                    profiler.enable()
                elif len(stamps) == options.warmup_steps + options.steps + 1:
                    profiler.disable()
            return super().update(n)

    train_module.tqdm = TimedTqdm
    try:
        train_module.train(args)
    finally:
        train_module.tqdm = base_tqdm
        if profiler is not None:
            profiler.disable()
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if len(intervals) != options.warmup_steps + options.steps:
        raise RuntimeError(f"expected {options.warmup_steps + options.steps} steps, saw {len(intervals)}")
    if profiler is not None:
        profiler.dump_stats(options.profile)
    return dict(stats=summarize(intervals[options.warmup_steps :]), memory=peak_memory(device))


# --- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    options, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(options.model_dir) if options.model_dir else tmp / "model"
        if not (model_dir / "model_index.json").is_file():
            start = time.perf_counter()
            save_tiny_sdxl(model_dir, options.preset, seed=options.seed)
            print(f"built the {options.preset!r} pipeline in {time.perf_counter() - start:.1f} s: {model_dir}")
        images = write_demo_images(tmp / "images", count=options.num_images, seed=options.seed)

        bare_args = parse_args(trainer_argv(options, model_dir, images, tmp / "bare-out", extra))
        trainer_args = parse_args(trainer_argv(options, model_dir, images, tmp / "trainer-out", extra))
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print(
            f"device {dev_name}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads\n"
            f"preset {options.preset}, {options.resolution} px, batch {options.train_batch_size}, "
            f"mixed precision {options.mixed_precision}, rank {options.rank}, "
            f"gradient checkpointing {options.gradient_checkpointing}, "
            f"train text encoder {options.train_text_encoder}, {options.num_images} images; "
            f"{options.warmup_steps} warm-up + {options.steps} timed steps"
        )
        if extra:
            print(f"extra trainer flags: {' '.join(extra)}")

        bare = trainer = None
        if not options.skip_bare:
            reset_peak_memory(device)
            bare = run_bare(bare_args, options, device)
            gc.collect()
        if not options.skip_trainer:
            reset_peak_memory(device)
            trainer = run_trainer(trainer_args, options, device)

    print("\n=== results ===")
    if bare:
        counts = bare["counts"]
        print(
            f"parameters: UNet {counts['unet'] / 1e6:.2f} M, text encoders {counts['text_encoders'] / 1e6:.2f} M, "
            f"VAE {counts['vae'] / 1e6:.2f} M; trainable LoRA: UNet {counts['trainable_unet'] / 1e6:.3f} M"
            + (f", text encoders {counts['trainable_text'] / 1e6:.3f} M" if counts["trainable_text"] else "")
        )
        print(f"bare step:   {describe(bare['stats'])}; peak memory {bare['memory']}")
    if trainer:
        print(f"trainer:     {describe(trainer['stats'])}; peak memory {trainer['memory']}")
    if bare and trainer:
        mean_ratio = trainer["stats"]["mean"] / bare["stats"]["mean"]
        median_ratio = trainer["stats"]["median"] / bare["stats"]["median"]
        print(f"overhead:    {mean_ratio:.3f}x trainer/bare (means), {median_ratio:.3f}x (medians)")


if __name__ == "__main__":
    main()

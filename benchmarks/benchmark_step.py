#!/usr/bin/env python
"""Seconds per optimizer step: the real trainer against a bare training step of the same models.

    python benchmarks/benchmark_step.py --preset tiny                  # 128 px
    python benchmarks/benchmark_step.py --preset small --steps 5       # 256 px
    python benchmarks/benchmark_step.py --preset tiny -- --use_dora    # extra trainer flags after `--`

It builds an SDXL-architecture pipeline with random weights (`sdxl_pivotal.tiny`) and a demo image set in a
temporary folder, then, in one process, times two things and prints them with their ratio ("overhead"):

bare
    A minimal training step written here: batch to the device, VAE encode (no grad) and latent sampling,
    noise, timesteps, `add_noise`, UNet forward, MSE loss, backward, gradient clipping (when
    `--max_grad_norm` > 0, as the trainer does), optimizer step, `zero_grad`. The models are those the
    trainer would use, set up by the package's own functions (`load_sdxl`, `add_adapters`,
    `place_models`, `create_optimizer`; none of this is timed) from the same parsed flags: the same UNet
    with the same LoRA, the same dtypes, the same optimizer. The batch is one batch of the trainer's
    dataset (same pixels, captions and micro-conditioning), kept on the CPU and reused at every step. The
    text encoders are called as the trainer calls them: once before the loop when they are frozen (the
    trainer caches each caption's embeddings), and at every step, with gradients, with
    `--train_text_encoder`. Mixed precision is `torch.autocast` (plus a GradScaler for fp16), which is
    what accelerate wraps the prepared models in.

trainer
    `sdxl_pivotal.train.train(args)` itself, args from `sdxl_pivotal.args.parse_args`. The trainer updates
    its tqdm progress bar exactly once per optimizer step, after `optimizer.zero_grad()`; this script
    replaces the `tqdm` name that `sdxl_pivotal.train` imported with a subclass whose `update()` takes a
    timestamp (after `torch.cuda.synchronize()` on CUDA) and then behaves as tqdm. The time between two
    updates is one whole iteration of the real loop: data loading and collation, RNG setup, the
    forward/backward, clipping, the optimizer and LR-scheduler steps, the progress bar and tracker logging
    (and a checkpoint, had one fallen due: `--checkpointing_steps` is set past the end of the run unless
    given after `--`). Model loading, the first `--warmup_steps` steps and the final LoRA export are
    outside the timed window. Nothing in the package is edited or re-implemented.

Two ways to schedule them (`--mode`):

interleaved (default)
    The bare models are set up first; then, inside each trainer `update()`, the clock of the trainer is
    stopped, one bare step is run and timed, and the trainer's clock restarts. Trainer step i and bare
    step i thus run back to back, under the same machine load: on a shared or throttled machine (such as
    a small cloud VM, where the speed of the same code drifts by 2-10x over seconds) this is the only way
    to get a stable ratio. Besides the ratio of means and of medians, the median of the per-step ratios is
    printed. Peak memory is given for the bare models alone (before the trainer loads) and for both
    together.
sequential
    All bare steps, then the bare models are freed, then the trainer. Peak memory is measured per phase
    (CUDA: reset in between). Use on a dedicated GPU, or with `--rounds` to repeat and pool.

Every step is synchronised on CUDA; the first `--warmup_steps` of each side are not timed. Peak memory on
CUDA is `torch.cuda.max_memory_allocated()`; on CPU it is the process's peak resident set size from
`resource.getrusage`, a high-water mark of the whole process so far (it cannot be reset).

Tracker: the trainer's default `--report_to tensorboard` is kept (pass `-- --report_to none` to drop it).
The figures are printed, never asserted. `--profile FILE` writes a cProfile of the trainer's timed steps
(bare steps excluded; cProfile slows Python-heavy code, so read it for where the time goes, not for totals).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import functools
import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sdxl_pivotal.train as train_module
from sdxl_pivotal.adapters import add_adapters, unet_parameters_by_lr_scale
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, collate, load_records
from sdxl_pivotal.models import load_sdxl, place_models, trained_models
from sdxl_pivotal.optim import create_optimizer, parameter_groups, trainable_parameters
from sdxl_pivotal.prompts import tokenize
from sdxl_pivotal.tiny import PRESETS, count_parameters, save_tiny_sdxl, write_demo_images

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
    parser.add_argument("--mode", default="interleaved", choices=["interleaved", "sequential"])
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement, pooling the steps")
    parser.add_argument("--num_images", type=int, default=None, help="default: a multiple of the batch size >= 8")
    parser.add_argument(
        "--photo_size",
        default=None,
        help="rewrite the demo images as JPEGs of this WIDTHxHEIGHT (e.g. 4032x3024, a phone photo), "
        "so that decoding and resizing cost what they cost with real photos",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    parser.add_argument("--model_dir", default=None, help="reuse (or create) the pipeline here instead of a temp dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_step", action="store_true", help="also print every timed step's seconds")
    parser.add_argument("--profile", default=None, help="write a cProfile of the trainer's timed steps here")
    options = parser.parse_args(argv)
    if options.resolution is None:
        options.resolution = DEFAULT_RESOLUTION[options.preset]
    if options.steps < 1 or options.warmup_steps < 0 or options.rounds < 1:
        parser.error("--steps and --rounds must be at least 1, --warmup_steps at least 0")
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
    return argv + extra  # argparse keeps the last value: flags after `--` override the above


def enlarge_images(folder: Path, size: str) -> None:
    """Replace the demo PNGs by JPEGs of `size` ("WxH"; portrait images get "HxW"), captions unchanged."""
    width, height = (int(v) for v in size.lower().split("x"))
    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as image:
            portrait = image.height > image.width
            target = (min(width, height), max(width, height)) if portrait else (width, height)
            image.convert("RGB").resize(target, Image.Resampling.BICUBIC).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        metadata.write_text(metadata.read_text().replace(".png", ".jpg"))


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
        times=times,
    )


def describe(stats: dict, per_step: bool = False) -> str:
    text = (
        f"{stats['mean']:.4f} s/step (mean of {stats['n']}; median {stats['median']:.4f}, "
        f"min {stats['min']:.4f}, max {stats['max']:.4f})"
    )
    if per_step:
        text += "\n             steps: " + " ".join(f"{t:.4f}" for t in stats["times"])
    return text


# --- bare step -----------------------------------------------------------------------------------------------


class BareStep:
    """The trainer's models, set up by the package (untimed), and a minimal training step written here."""

    def __init__(self, args: argparse.Namespace, seed: int, device: torch.device, total_steps: int):
        self.args, self.device = args, device
        if getattr(args, "with_prior_preservation", False):
            print("note: the bare step has no class images; it does not model --with_prior_preservation")
        records = load_records(args)
        parts = load_sdxl(args)
        torch.manual_seed(seed)  # as the trainer: the adapters start from the seed
        adapter_plan = add_adapters(parts, args)
        pivotal = getattr(args, "train_text_encoder_ti", False)
        if pivotal:  # pivotal tuning: new tokens in both tokenizers and encoders, as the trainer adds them
            from sdxl_pivotal.tokens import PivotalTokens, add_new_tokens

            tokens = PivotalTokens.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)
            records = [dataclasses.replace(r, caption=tokens.substitute(r.caption)) for r in records]
            encoders = [parts.text_encoder, parts.text_encoder_2]
            add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, tokens, args.initializer_token)
        # The trainer trains text-encoder parameters during the first round(frac x total) steps only.
        if pivotal:
            self.text_stop = round(args.train_text_encoder_ti_frac * total_steps)
        elif args.train_text_encoder:
            self.text_stop = round(args.train_text_encoder_frac * total_steps)
        else:
            self.text_stop = 0
        if args.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if args.train_text_encoder or pivotal:
                parts.text_encoder.gradient_checkpointing_enable()
                parts.text_encoder_2.gradient_checkpointing_enable()
        self.weight_dtype = AUTOCAST_DTYPES.get(args.mixed_precision, torch.float32)
        place_models(parts, device, self.weight_dtype, vae_fp32=not args.pretrained_vae_model_name_or_path)
        models = trained_models(parts, args)
        unet_params = trainable_parameters(parts.unet)
        text_params = [p for name, m in models.items() if name != "unet" for p in trainable_parameters(m)]
        unet_groups = unet_parameters_by_lr_scale(parts.unet, adapter_plan)
        self.optimizer = create_optimizer(args, parameter_groups(args, unet_groups, text_params))
        self.params = unet_params + text_params
        for model in models.values():
            model.train()
        self.counts = dict(
            unet=count_parameters(parts.unet) - sum(p.numel() for p in unet_params),
            text_encoders=count_parameters(parts.text_encoder) + count_parameters(parts.text_encoder_2),
            vae=count_parameters(parts.vae),
            trainable_unet=sum(p.numel() for p in unet_params),
            trainable_text=sum(p.numel() for p in text_params),
        )

        dataset = DreamBoothDataset(records, args, seed)
        self.batch = collate([dataset[(0, i)] for i in range(args.train_batch_size)])
        self.vae, self.unet, self.scheduler = parts.vae, parts.unet, parts.noise_scheduler
        self.vae_dtype = self.vae.dtype
        self.encoders = [parts.text_encoder, parts.text_encoder_2]
        self.token_ids = [
            tokenize(t, self.batch.captions)[:, 0].to(device) for t in (parts.tokenizer, parts.tokenizer_2)
        ]
        self.layer = -2 if args.clip_skip is None else -(args.clip_skip + 2)
        autocast_dtype = AUTOCAST_DTYPES.get(args.mixed_precision)
        self.autocast = (
            functools.partial(torch.autocast, device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
        self.frozen_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.steps_done = 0

    def encode_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = []
        for encoder, ids in zip(self.encoders, self.token_ids, strict=True):
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[self.layer])
        return torch.cat(hidden, dim=-1), output[0]

    def text_conditioning(self) -> tuple[torch.Tensor, torch.Tensor]:
        """With gradients while the text encoders train; afterwards encoded once and reused, as the trainer."""
        if self.steps_done < self.text_stop:
            self.frozen_embeds = None
            return self.encode_text()
        if self.frozen_embeds is None:
            with torch.no_grad():
                self.frozen_embeds = self.encode_text()
        return self.frozen_embeds

    def micro_batch_loss(self) -> torch.Tensor:
        args, device, batch, scheduler = self.args, self.device, self.batch, self.scheduler
        pixels = batch.pixel_values.to(device, dtype=self.vae_dtype)  # the batch arrives on the CPU
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with self.autocast():
            prompt_embeds, pooled = self.text_conditioning()
            time_ids = batch.time_ids.to(device, dtype=prompt_embeds.dtype)
            prediction = self.unet(
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
            snr = self.alphas_cumprod[timesteps] / (1 - self.alphas_cumprod[timesteps])
            denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
            loss = loss * snr.clamp(max=args.snr_gamma) / denominator
        return loss.mean()

    def step(self) -> float:
        """One optimizer step (of `--gradient_accumulation_steps` micro-batches); returns the loss."""
        accumulation = self.args.gradient_accumulation_steps
        total = 0.0
        for _ in range(accumulation):
            loss = self.micro_batch_loss() / accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.item()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return total

    def timed_step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.device)
        return time.perf_counter() - start


# --- the trainer ---------------------------------------------------------------------------------------------


def run_trainer(
    args: argparse.Namespace,
    options: argparse.Namespace,
    device: torch.device,
    bare: BareStep | None = None,
    profile_to: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Run `train(args)` with a tqdm whose `update()` times every optimizer step; with `bare`, run one bare
    step inside every update, with the trainer's clock stopped (interleaved mode); `on_step(n)` is called,
    untimed, after the n-th step."""
    trainer_times: list[float] = []
    bare_times: list[float] = []
    resume = [0.0]  # when the trainer's clock last (re)started
    profiler = cProfile.Profile() if profile_to else None
    total = options.warmup_steps + options.steps
    base_tqdm = train_module.tqdm

    class TimedTqdm(base_tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            synchronize(device)
            resume[0] = time.perf_counter()

        def update(self, n=1):
            synchronize(device)
            trainer_times.append(time.perf_counter() - resume[0])
            profiling = profiler is not None and options.warmup_steps <= len(trainer_times) < total
            if profiler is not None:
                profiler.disable()
            if bare is not None:
                bare_times.append(bare.timed_step())
            if on_step is not None:
                on_step(len(trainer_times))
            if profiling:
                profiler.enable()
            synchronize(device)
            resume[0] = time.perf_counter()
            return super().update(n)

    train_module.tqdm = TimedTqdm
    if profiler is not None and options.warmup_steps == 0:
        profiler.enable()  # the first step starts in the trainer, before any update()
    try:
        train_module.train(args)
    finally:
        train_module.tqdm = base_tqdm
        if profiler is not None:
            profiler.disable()
    if len(trainer_times) != total:
        raise RuntimeError(
            f"timed {len(trainer_times)} trainer steps instead of {total}: the timing hook relies on "
            "sdxl_pivotal.train creating one `tqdm` progress bar and calling its update() once per optimizer step"
        )
    if profiler is not None:
        profiler.dump_stats(profile_to)
    return dict(
        trainer=trainer_times[options.warmup_steps :],
        bare=bare_times[options.warmup_steps :],
        memory=peak_memory(device),
    )


# --- main ----------------------------------------------------------------------------------------------------


def measure_round(options, extra, device, model_dir, images, out, profile_to) -> dict:
    # The bare step reads the trainer's own parsed flags (LoRA, optimizer, loss options, ...).
    bare_args = parse_args(trainer_argv(options, model_dir, images, out / "bare", extra))
    trainer_args = parse_args(trainer_argv(options, model_dir, images, out / "trainer", extra))
    reset_peak_memory(device)
    bare = BareStep(bare_args, options.seed, device, total_steps=options.warmup_steps + options.steps)
    result = dict(counts=bare.counts)
    if options.mode == "interleaved":
        bare.timed_step()  # one extra warm-up step, so that the memory of the bare step alone is known
        bare.steps_done = 0  # bare step i pairs with trainer step i (text encoders train for the same steps)
        result["bare_memory"] = peak_memory(device)
        run = run_trainer(trainer_args, options, device, bare=bare, profile_to=profile_to)
        result.update(bare_times=run["bare"], trainer_times=run["trainer"], both_memory=run["memory"])
    else:
        times = [bare.timed_step() for _ in range(options.warmup_steps + options.steps)]
        result.update(bare_times=times[options.warmup_steps :], bare_memory=peak_memory(device))
        del bare
        gc.collect()
        reset_peak_memory(device)
        run = run_trainer(trainer_args, options, device, profile_to=profile_to)
        result.update(trainer_times=run["trainer"], trainer_memory=run["memory"])
    return result


def main(argv: list[str] | None = None) -> None:
    options, extra = parse_cli(sys.argv[1:] if argv is None else argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    rounds = []
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(options.model_dir) if options.model_dir else tmp / "model"
        if not (model_dir / "model_index.json").is_file():
            start = time.perf_counter()
            save_tiny_sdxl(model_dir, options.preset, seed=options.seed)
            print(f"built the {options.preset!r} pipeline in {time.perf_counter() - start:.1f} s: {model_dir}")
        images = write_demo_images(tmp / "images", count=options.num_images, seed=options.seed)
        if options.photo_size:
            enlarge_images(images, options.photo_size)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
        print(
            f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads\n"
            f"preset {options.preset}, {options.resolution} px, batch {options.train_batch_size}, "
            f"mixed precision {options.mixed_precision}, rank {options.rank}, "
            f"gradient checkpointing {options.gradient_checkpointing}, "
            f"train text encoder {options.train_text_encoder}, {options.num_images} images"
            f"{' of ' + options.photo_size if options.photo_size else ''}; "
            f"{options.mode}, {options.rounds} round(s) of {options.warmup_steps} warm-up + {options.steps} "
            "timed steps"
        )
        if extra:
            print(f"extra trainer flags: {' '.join(extra)}")
        for index in range(options.rounds):
            profile_to = options.profile if index == 0 else None
            result = measure_round(options, extra, device, model_dir, images, tmp / f"round-{index}", profile_to)
            rounds.append(result)
            gc.collect()
            if options.rounds > 1:
                b, t = summarize(result["bare_times"]), summarize(result["trainer_times"])
                print(
                    f"round {index + 1}: bare {b['mean']:.4f} s/step, trainer {t['mean']:.4f} s/step, "
                    f"ratio {t['mean'] / b['mean']:.3f}x (of medians {t['median'] / b['median']:.3f}x)"
                )

    counts = rounds[0]["counts"]
    bare = summarize([t for r in rounds for t in r["bare_times"]])
    trainer = summarize([t for r in rounds for t in r["trainer_times"]])
    pooled = f"{len(rounds)} rounds pooled, " if len(rounds) > 1 else ""
    print("\n=== results ===")
    print(
        f"parameters: UNet {counts['unet'] / 1e6:.2f} M, text encoders {counts['text_encoders'] / 1e6:.2f} M, "
        f"VAE {counts['vae'] / 1e6:.2f} M; trainable: UNet {counts['trainable_unet']:,}"
        + (f", text encoders {counts['trainable_text']:,}" if counts["trainable_text"] else "")
    )
    print(f"bare step:   {pooled}{describe(bare, options.per_step)}")
    print(f"trainer:     {pooled}{describe(trainer, options.per_step)}")
    ratios = f"{trainer['mean'] / bare['mean']:.3f}x (means), {trainer['median'] / bare['median']:.3f}x (medians)"
    if options.mode == "interleaved":
        pairs = [t / b for r in rounds for t, b in zip(r["trainer_times"], r["bare_times"], strict=True)]
        ratios += f", {statistics.median(pairs):.3f}x (median of per-step ratios)"
    print(f"overhead:    trainer/bare {ratios}; target <= 1.15x")
    first = rounds[0]
    print(f"peak memory, bare step alone: {first['bare_memory']}")
    if options.mode == "interleaved":
        print(f"peak memory, bare + trainer models together: {first['both_memory']}")
    else:
        print(f"peak memory, trainer: {first['trainer_memory']}")


if __name__ == "__main__":
    main()

"""Pretrain the embedded tiny SDXL on the procedural world (`sdxl_pivotal.world`), then export its weights.

    python -m sdxl_pivotal.pretrain_world --work_dir world-run --export_dir sdxl_pivotal/assets/tiny-world

Two stages, both seeded and resumable (rerun the same command; it continues from the last checkpoint in
`--work_dir`, and the result is the same as an uninterrupted run):
1. the VAE (`AutoencoderKL`), as an autoencoder: MSE reconstruction plus a small KL term, on 32 px crops of
   fresh scenes of any colours (`world.autoencoder_batch`);
   its `scaling_factor` is then set to 1 / std of the latents, as SDXL's is;
2. the UNet, with the text encoders as built (random, frozen): the standard epsilon-prediction loss with
   min-SNR-5 weighting (`losses.min_snr_weights`), 10% empty prompts (zero embeddings, as SDXL's
   `force_zeros_for_empty_prompt`) for classifier-free guidance, an EMA of the weights (diffusers' `EMAModel`).
The scenes of step N come from seed (seed, N); the UNet trains on a fixed set of encoded scenes.
With `--init_from` an earlier export (e.g. the world at 64 px) is trained further at `--resolution` (progressive
resolution, as SDXL itself was trained): its VAE (and `scaling_factor`) and text encoders are kept, the VAE
stage is skipped, and the UNet continues from its weights.
The export (fp16 safetensors per component, the tokenizer files, `recipe.json`) is what
`python -m sdxl_pivotal.tiny --pretrained` builds a diffusers folder from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .losses import min_snr_weights
from .tiny import WORLD_VOCAB_WORDS, build_pretrained_tiny_sdxl, build_tiny_sdxl_pipeline, write_clip_vocab
from .world import all_captions, autoencoder_batch, world_batch

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="world-run", help="checkpoints and logs (resume from here)")
    parser.add_argument("--export_dir", default=None, help="write the final fp16 weights here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae_steps", type=int, default=600)
    parser.add_argument("--vae_batch_size", type=int, default=16)
    parser.add_argument("--vae_crop", type=int, default=32, help="VAE training crop size (pixels)")
    parser.add_argument("--vae_lr", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-5)
    parser.add_argument("--unet_steps", type=int, default=12000)
    parser.add_argument("--unet_batch_size", type=int, default=32)
    parser.add_argument("--unet_lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--num_scenes", type=int, default=4096, help="encoded scenes the UNet trains on")
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument(
        "--init_from",
        default=None,
        help="an earlier --export_dir to train further (at --resolution): keeps its VAE, skips the VAE stage",
    )
    args = parser.parse_args(argv)
    if args.init_from and not (Path(args.init_from) / "recipe.json").is_file():
        parser.error(f"--init_from {args.init_from}: no recipe.json there; pass an earlier run's --export_dir.")
    return args


# --- checkpoints: safetensors for tensors, JSON for the rest ---------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors ("opt.<param>.<name>") and its param groups (JSON-able)."""
    state = optimizer.state_dict()
    tensors = {f"opt.{i}.{name}": value for i, entry in state["state"].items() for name, value in entry.items()}
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write `checkpoint.safetensors` + `checkpoint.json` atomically (a temporary folder, then a rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "checkpoint.safetensors")
    (tmp / "checkpoint.json").write_text(json.dumps(info))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def latest_checkpoint(work_dir: Path, stage: str) -> Path | None:
    """The `<stage>-<step>` folder with the highest step, or None."""
    found = sorted(work_dir.glob(f"{stage}-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    found = [p for p in found if not p.name.endswith(".tmp")]
    return found[-1] if found else None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --- stage 1: the VAE ----------------------------------------------------------------------------------


def resume_stage(
    work_dir: Path, stage: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Load the stage's latest checkpoint into `model` and `optimizer`; return (its step, its tensors, its info),
    or (0, {}, {}) when there is none."""
    checkpoint = latest_checkpoint(work_dir, stage)
    if checkpoint is None:
        return 0, {}, {}
    tensors = load_file(checkpoint / "checkpoint.safetensors")
    info = json.loads((checkpoint / "checkpoint.json").read_text())
    model.load_state_dict(prefixed(tensors, "model."))
    load_optimizer(optimizer, tensors, info["optimizer"])
    return info["step"], tensors, info


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> a float tensor in [-1, 1], (B, 3, H, W)."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, args, work_dir: Path) -> None:
    # Start as a plain autoencoder: the posterior's log-variance (the second half of `quant_conv`'s outputs) at
    # -10, i.e. std 0.007. From log-variance 0 the latent noise (std 1) hides the image for hundreds of steps.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    start, _, _ = resume_stage(work_dir, "vae", vae, optimizer)
    vae.train()
    for step in tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="vae"):
        images = autoencoder_batch(args.seed * 1_000_003 + step, args.vae_batch_size, args.resolution)
        torch.manual_seed(args.seed * 1_000_003 + step)  # the crop and the posterior sample
        # The VAE is convolutional: random crops teach it the world's edges and colours at a fraction of the cost.
        top, left = torch.randint(0, args.resolution - args.vae_crop + 1, (2,)).tolist()
        pixels = images_to_tensor(images)[:, :, top : top + args.vae_crop, left : left + args.vae_crop]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        loss = mse + args.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log(work_dir, {"stage": "vae", "step": step + 1, "mse": mse.item()})
        if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.vae_steps:
            opt_tensors, groups = optimizer_tensors(optimizer)
            model = {f"model.{k}": v for k, v in vae.state_dict().items()}
            save_checkpoint(
                work_dir / f"vae-{step + 1}", {**model, **opt_tensors}, {"step": step + 1, "optimizer": groups}
            )
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, args) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode `num_scenes` scenes once: posterior means, stds and captions."""
    means, stds, captions = [], [], []
    batch = 256
    for start in tqdm(range(0, args.num_scenes, batch), desc="encode"):
        images, caps = world_batch(args.seed * 1_000_003 + 10_000_000 + start, batch, args.resolution)
        posterior = vae.encode(images_to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


# --- stage 2: the UNet ---------------------------------------------------------------------------------


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{caption: (prompt_embeds [77, D], pooled [D2])}, with the pipeline's own `encode_prompt`; "" -> zeros."""
    table = {}
    for caption in captions:
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        table[caption] = (embeds[0], pooled[0])
    embeds, pooled = table[captions[0]]
    table[""] = (torch.zeros_like(embeds), torch.zeros_like(pooled))
    return table


def train_unet(pipe, args, work_dir: Path) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    # Training noise is DDPM's (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise), on the pipeline's own betas, as
    # the trainer (`models.load_noise_scheduler`) does; the pipeline's Euler sampler scales its inputs to match.
    unet, vae, scheduler = pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
    start, tensors, info = resume_stage(work_dir, "unet", unet, optimizer)
    if start:
        shadow = prefixed(tensors, "ema.")
        ema.load_state_dict({**info["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    if start < args.unet_steps:  # (a finished run only exports)
        means, stds, captions = encode_scenes(vae, args)
        texts = encode_captions(pipe, all_captions())
    size = args.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(args.unet_batch_size, 1)
    unet.train()
    for step in tqdm(range(start, args.unet_steps), initial=start, total=args.unet_steps, desc="unet"):
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, len(captions), (args.unet_batch_size,), generator=generator)
        latent_noise = torch.randn(means[index].shape, generator=generator)
        latents = (means[index] + stds[index] * latent_noise) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        drop = torch.rand(len(index), generator=generator) < args.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist(), strict=True)]
        embeds = torch.stack([texts[c][0] for c in batch_captions])
        pooled = torch.stack([texts[c][1] for c in batch_captions])
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps, 5.0)).mean()
        for group in optimizer.param_groups:  # linear warm-up, then constant (so a shorter run is a prefix)
            group["lr"] = args.unet_lr * min(1.0, (step + 1) / args.warmup_steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        log(work_dir, {"stage": "unet", "step": step + 1, "loss": loss.item()})
        if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.unet_steps:
            opt_tensors, groups = optimizer_tensors(optimizer)
            ema_state = ema.state_dict()
            shadow = {f"ema.{i}": p for i, p in enumerate(ema_state.pop("shadow_params"))}
            model = {f"model.{k}": v for k, v in unet.state_dict().items()}
            info = {"step": step + 1, "optimizer": groups, "ema": ema_state}
            save_checkpoint(work_dir / f"unet-{step + 1}", {**model, **opt_tensors, **shadow}, info)
    ema.copy_to(unet.parameters())
    unet.eval()


def log(work_dir: Path, row: dict) -> None:
    with open(work_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


# --- export --------------------------------------------------------------------------------------------


def export(pipe, args, export_dir: Path) -> None:
    """fp16 safetensors of each component, the tokenizer files and `recipe.json` into `export_dir`."""
    export_dir.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in getattr(pipe, name).state_dict().items()}
        save_file(state, export_dir / f"{name}.safetensors")
    write_clip_vocab(export_dir, WORLD_VOCAB_WORDS)
    skipped = {"work_dir", "export_dir", "init_from"}
    if args.init_from:  # no VAE stage
        skipped |= {"vae_steps", "vae_batch_size", "vae_crop", "vae_lr", "kl_weight"}
    options = {k: v for k, v in vars(args).items() if k not in skipped}
    recipe = {
        "command": "python -m sdxl_pivotal.pretrain_world " + " ".join(f"--{k} {v}" for k, v in options.items()),
        "preset": "tiny",
        "resolution": args.resolution,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
    }
    if args.init_from:  # the earlier stage's recipe: run it with --export_dir X, then this one with --init_from X
        recipe["init_from"] = json.loads((Path(args.init_from) / "recipe.json").read_text())
    (export_dir / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.init_from:
        pipe = build_pretrained_tiny_sdxl(args.init_from)
    else:
        vocab_dir = work_dir / "vocab"
        write_clip_vocab(vocab_dir, WORLD_VOCAB_WORDS)
        pipe = build_tiny_sdxl_pipeline("tiny", seed=args.seed, vocab_dir=vocab_dir)
    pipe.text_encoder.requires_grad_(False)
    pipe.text_encoder_2.requires_grad_(False)
    if not args.init_from:
        train_vae(pipe.vae, args, work_dir)
        means, _, _ = encode_scenes(pipe.vae, argparse.Namespace(**{**vars(args), "num_scenes": 1024}))
        pipe.vae.register_to_config(scaling_factor=float(1 / means.std()))
    pipe.vae.requires_grad_(False)
    print(f"vae scaling_factor {pipe.vae.config.scaling_factor:.4f}")
    train_unet(pipe, args, work_dir)
    print(f"this session: {time.time() - started:.0f} s")
    if args.export_dir:
        export(pipe, args, Path(args.export_dir))
        print(f"exported to {args.export_dir}")


if __name__ == "__main__":
    main()

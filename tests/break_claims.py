"""Break each README claim in a scratch copy of the repository, one edit at a time, and record which test fails
first (the table in tests/CLAIMS.md).

    cp -a . /tmp/scratch && python tests/break_claims.py /tmp/scratch /tmp/breaks.json [key ...]

Each entry: key, the claim, the file, its (old, new) edits, and the test files to run (`pytest -x`, in order).
The file is restored after each run; results are appended to the JSON file (keys already there are skipped).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

B = [
    (
        "pivot-rows",
        "Pivotal tuning trains only the new rows; old vocabulary bit-identical",
        "sdxl_pivotal/tokens.py",
        [("base.requires_grad_(False)", "base.requires_grad_(True)")],
        ["tests/test_pivotal.py"],
    ),
    (
        "pivot-own-row",
        "Each new embedding row is trained from its own token",
        "sdxl_pivotal/tokens.py",
        [("[(input_ids - self.first_new_id).clamp(min=0)]", "[(input_ids - self.first_new_id - 1).clamp(min=0)]")],
        ["tests/test_pivotal.py", "tests/test_oracle.py"],
    ),
    (
        "pivot-steps",
        "The pivot counts optimizer steps (one-epoch run trains tokens)",
        "sdxl_pivotal/train.py",
        [
            (
                "return round(args.train_text_encoder_ti_frac * total_steps)",
                "return int(args.train_text_encoder_ti_frac)",
            )
        ],
        ["tests/test_pivotal.py"],
    ),
    (
        "te-frac",
        "Text-encoder training stops after --train_text_encoder_frac of the optimizer steps",
        "sdxl_pivotal/train.py",
        [("return round(args.train_text_encoder_frac * total_steps)", "return total_steps")],
        ["tests/test_training.py::test_text_encoder_lora_stops_at_its_fraction"],
    ),
    (
        "resume-data",
        "Exact resume: data order",
        "sdxl_pivotal/data.py",
        [
            (
                "epoch, first = divmod(self.start_step, self.plan.steps_per_epoch)",
                "epoch, first = divmod(0, self.plan.steps_per_epoch)",
            )
        ],
        ["tests/test_data.py", "tests/test_training.py"],
    ),
    (
        "ckpt-atomic",
        "Checkpoints are complete or absent",
        "sdxl_pivotal/export.py",
        [
            (
                'staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))',
                "target.mkdir(exist_ok=True)\n    staging = target",
            ),
            ("        if staging.exists():\n            shutil.rmtree(staging)", "        pass"),
        ],
        [
            "tests/test_training.py::test_crash_while_writing_checkpoint_leaves_none",
            "tests/test_training.py::test_resume_after_interruption_is_exact",
        ],
    ),
    (
        "prodigy-bool",
        "--prodigy_decouple False means False",
        "sdxl_pivotal/args.py",
        [
            (
                '_add_bool(g, "--prodigy_decouple", True, "Prodigy: decoupled weight decay")',
                'g.add_argument("--prodigy_decouple", type=bool, default=True)',
            )
        ],
        ["tests/test_args.py"],
    ),
    (
        "lora-alpha",
        "--lora_alpha is honoured by diffusers' loader",
        "sdxl_pivotal/adapters.py",
        [("            lora_alpha=args.lora_alpha,", "            lora_alpha=args.rank,")],
        ["tests/test_formats.py", "tests/test_adapters.py"],
    ),
    (
        "snr-v",
        "min-SNR weighting is correct for v-prediction",
        "sdxl_pivotal/losses.py",
        [("return clamped / (snr + 1)", "return clamped / snr + 1")],
        ["tests/test_losses.py", "tests/test_oracle.py"],
    ),
    (
        "overwrite",
        "An earlier run's results are never overwritten without --resume/--overwrite_output_dir",
        "sdxl_pivotal/args.py",
        [("if args.resume_from_checkpoint or args.overwrite_output_dir or not out.is_dir():", "if True:")],
        ["tests/test_args.py"],
    ),
    (
        "corrupt-named",
        "Corrupt images are named before any model loads",
        "sdxl_pivotal/data.py",
        [
            (
                'raise InputError(f"Cannot read image {name}: {error}. Fix or remove the file.") from error',
                'raise InputError(f"Cannot read image: {error}.") from error',
            )
        ],
        ["tests/test_data.py"],
    ),
    (
        "cache-posterior",
        "Cached latents keep the posterior: each step samples a fresh latent",
        "sdxl_pivotal/latents.py",
        [
            (
                "params = vae.encode(pixels).latent_dist.parameters.float().cpu()",
                "params = vae.encode(pixels).latent_dist.parameters.float().cpu()\n"
                "                params[:, params.shape[1] // 2 :] = -30.0",
            )
        ],
        ["tests/test_latents.py"],
    ),
    (
        "cache-vae-key",
        "Disk latent cache keyed by the VAE encoder's weights",
        "sdxl_pivotal/latents.py",
        [('fingerprint = vae_fingerprint(vae) if cache_dir else ""', 'fingerprint = ""')],
        ["tests/test_latents.py", "tests/test_oracle.py"],
    ),
    (
        "cache-flip-crop",
        "Cached flips carry the mirrored crop",
        "sdxl_pivotal/latents.py",
        [("crops.append((top, resized.width - left - size.width))", "crops.append((top, left))")],
        ["tests/test_latents.py"],
    ),
    (
        "cache-bucket-target",
        "Cached latents with buckets: same micro-conditioning as uncached",
        "sdxl_pivotal/data.py",
        [
            (
                "return Sample(None, caption, entry.original_size, entry.crop_top_left, size.hw, None, entry.params)",
                "return Sample(None, caption, entry.original_size, entry.crop_top_left, "
                "tuple(size), None, entry.params)",
            )
        ],
        ["tests/test_latents.py", "tests/test_oracle.py"],
    ),
    (
        "prior-weight",
        "loss = instance loss + prior_loss_weight x class loss",
        "sdxl_pivotal/train.py",
        [("return instance_loss + args.prior_loss_weight * prior_loss", "return instance_loss + prior_loss")],
        ["tests/test_prior.py", "tests/test_oracle.py"],
    ),
    (
        "prior-own-snr",
        "instance and class halves each with their own min-SNR weights",
        "sdxl_pivotal/train.py",
        [("(weights[:n], weights[n:])", "(weights[n:], weights[:n])")],
        ["tests/test_prior.py", "tests/test_oracle.py"],
    ),
    (
        "prior-pairing",
        "Pairing walks through all class images across epochs",
        "sdxl_pivotal/data.py",
        [
            (
                "record = self.class_records[(epoch * len(self) + index) % len(self.class_records)]",
                "record = self.class_records[index % len(self.class_records)]",
            )
        ],
        ["tests/test_prior.py", "tests/test_data.py", "tests/test_oracle.py"],
    ),
    (
        "class-seed",
        "Class image i always comes from (seed, i)",
        "sdxl_pivotal/class_images.py",
        [("manual_seed(class_image_seed(seed, i))", "manual_seed(class_image_seed(0, i))")],
        ["tests/test_class_images.py", "tests/test_oracle.py"],
    ),
    (
        "accumulation",
        "One optimizer step consumes --gradient_accumulation_steps batches, loss averaged",
        "sdxl_pivotal/train.py",
        [("accelerator.backward(loss / len(micro_batches))", "accelerator.backward(loss)")],
        ["tests/test_oracle.py", "tests/test_training.py"],
    ),
    (
        "block-lr",
        "--unet_block_lr multiplies the learning rate per block",
        "sdxl_pivotal/optim.py",
        [
            (
                '{"params": params, "lr": args.learning_rate * scale, "weight_decay": args.adam_weight_decay}',
                '{"params": params, "lr": args.learning_rate, "weight_decay": args.adam_weight_decay}',
            )
        ],
        ["tests/test_adapters.py", "tests/test_oracle.py"],
    ),
    (
        "block-lr-zero",
        "A block at learning rate 0 gets no adapter",
        "sdxl_pivotal/adapters.py",
        [("if rank == 0 or lr_scale == 0:", "if rank == 0:")],
        ["tests/test_adapters.py"],
    ),
    (
        "flip-crop",
        "random flip mirrors the crop's left edge (micro-conditioning)",
        "sdxl_pivotal/data.py",
        [("        left = width - left - crop_width\n", "")],
        ["tests/test_data.py"],
    ),
    (
        "exif",
        "EXIF orientation applied",
        "sdxl_pivotal/data.py",
        [("    image = ImageOps.exif_transpose(image)\n", "")],
        ["tests/test_data.py"],
    ),
    (
        "time-ids",
        "SDXL micro-conditioning order (original, crop, target)",
        "sdxl_pivotal/data.py",
        [
            (
                "list(s.original_size + s.crop_top_left + s.target_size)",
                "list(s.target_size + s.crop_top_left + s.original_size)",
            )
        ],
        ["tests/test_data.py", "tests/test_oracle.py", "tests/test_latents.py"],
    ),
    (
        "buckets-batch",
        "Every batch comes from one bucket",
        "sdxl_pivotal/data.py",
        [("self.groups = groups if groups is not None and len(set(groups)) > 1 else None", "self.groups = None")],
        ["tests/test_buckets.py", "tests/test_data.py"],
    ),
    (
        "keep-tokens",
        "--shuffle_caption keeps the first --keep_tokens tags",
        "sdxl_pivotal/data.py",
        [("kept, rest = tags[:keep_tokens], tags[keep_tokens:]", "kept, rest = tags[:0], tags")],
        ["tests/test_captions.py"],
    ),
    (
        "caption-dropout",
        "--caption_dropout P: probability of an empty caption",
        "sdxl_pivotal/data.py",
        [("if dropout and rng.random() < dropout:", "if False:")],
        ["tests/test_captions.py"],
    ),
    (
        "noise-offset",
        "offset noise: one constant per channel",
        "sdxl_pivotal/losses.py",
        [
            (
                "offset = randn_tensor((*latents.shape[:2], 1, 1), **like)",
                "offset = randn_tensor(latents.shape, **like)",
            )
        ],
        ["tests/test_losses.py"],
    ),
    (
        "edm-weights",
        "EDM-style: regressed on x0 with weight 1/sigma^2",
        "sdxl_pivotal/losses.py",
        [("return sigmas.flatten().float() ** -2", "return sigmas.flatten().float() ** -1")],
        [
            "tests/test_losses.py",
            "tests/test_training.py::test_edm_style_training_lowers_its_loss_and_resumes_exactly",
        ],
    ),
    (
        "tiny-image",
        "Images below 32 px refused, named",
        "sdxl_pivotal/data.py",
        [("if min(image.size) < MIN_IMAGE_SIDE:", "if False:")],
        ["tests/test_dataset_input.py"],
    ),
    (
        "lazy-dataset",
        "--dataset_name keeps files or encoded bytes, not decoded images",
        "sdxl_pivotal/data.py",
        [
            (
                'return ImageRecord(caption, size=size, encoded=value["bytes"], label=label)',
                'return ImageRecord(caption, image=open_image(io.BytesIO(value["bytes"])), size=size, label=label)',
            )
        ],
        ["tests/test_dataset_input.py"],
    ),
    (
        "lokr-untucked",
        "LoKr --use_effective_conv2d: kohya file applies in ComfyUI/Forge/A1111",
        "sdxl_pivotal/formats/families.py",
        [('    if "lokr_t2" in peft:\n        peft = untucked_lokr_w2(peft)\n', "")],
        ["tests/test_adapters.py"],
    ),
    (
        "dora-comfy",
        "DoRA kohya file: ComfyUI/Forge reproduce the trained weights",
        "sdxl_pivotal/formats/kohya.py",
        [("scaled = magnitude / ratio if inverse else magnitude * ratio", "scaled = magnitude")],
        ["tests/test_adapters.py", "tests/test_formats.py"],
    ),
    (
        "kohya-alpha",
        "kohya file: each module with its real alpha",
        "sdxl_pivotal/formats/families.py",
        [
            (
                'kohya = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _alpha(scale * down.shape[0])}',
                'kohya = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _alpha(down.shape[0])}',
            )
        ],
        ["tests/test_adapters.py", "tests/test_formats.py"],
    ),
    (
        "hub-token",
        "--hub_token is never printed or written to the trackers",
        "sdxl_pivotal/train.py",
        [('        if key != "hub_token"\n', "")],
        ["tests/test_hub.py", "tests/test_args.py"],
    ),
    (
        "validation-seed",
        "Validation images from a fixed seed; final reproduces them",
        "sdxl_pivotal/validation.py",
        [("generator = torch.Generator(pipeline.device).manual_seed(seed)", "generator = None")],
        ["tests/test_validation.py"],
    ),
    (
        "quant-swap",
        "--quantize_unet: the backward pass keeps the quantised weight, not a full-precision copy",
        "sdxl_pivotal/quantization.py",
        [("        model.set_submodule(path, new)\n", "")],
        ["tests/test_quantization.py"],
    ),
    (
        "quant-adapters",
        "--quantize_unet: the LoRA layers stay float32 on top of the quantised frozen weights",
        "sdxl_pivotal/quantization.py",
        [
            (
                "return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad",
                "return isinstance(module, torch.nn.Linear)",
            )
        ],
        ["tests/test_quantization.py"],
    ),
    (
        "quant-backward",
        "--quantize_unet: gradients are those of the stored (dequantised) weights",
        "sdxl_pivotal/quantization.py",
        [
            (
                "grad_input = grad_output @ ctx.weight.dequantize(grad_output.dtype)",
                "grad_input = grad_output @ ctx.weight.qdata.to(grad_output.dtype)",
            )
        ],
        ["tests/test_quantization.py"],
    ),
    (
        "rng-keys",
        "Named RNG streams keep their historical keys (exact resume of old checkpoints)",
        "sdxl_pivotal/rng.py",
        [
            (
                "return np.random.default_rng([seed, epoch, index, int(Tag.CAPTION)])",
                "return np.random.default_rng([seed, epoch, index, 4])",
            )
        ],
        ["tests/test_rng.py", "tests/test_captions.py"],
    ),
    (
        "single-qkv",
        "Single-file checkpoint: OpenCLIP-G attention as one in_proj (q, k, v stacked)",
        "sdxl_pivotal/formats/single_file.py",
        [('_QKV = ("q_proj", "k_proj", "v_proj")', '_QKV = ("k_proj", "q_proj", "v_proj")')],
        ["tests/test_single_file.py"],
    ),
    (
        "single-projection",
        "Single-file checkpoint: OpenCLIP-G text_projection transposed (x @ P)",
        "sdxl_pivotal/formats/single_file.py",
        [('value.T.contiguous() if name == "text_projection" else value', "value")],
        ["tests/test_single_file.py"],
    ),
    (
        "single-every-key",
        "Single-file checkpoint: diffusers' conversion reads every key of the file",
        "sdxl_pivotal/formats/single_file.py",
        [
            (
                "return {CLIP_G_PREFIX + name: value for name, value in fused.items()}",
                "return {CLIP_G_PREFIX + name: value for name, value in fused.items()}"
                ' | {CLIP_G_PREFIX + "logit_scale": torch.ones(())}',
            )
        ],
        ["tests/test_single_file.py"],
    ),
    (
        "single-vocabulary",
        "Single-file checkpoint keeps the base vocabulary; the new tokens go to the _emb file beside it",
        "sdxl_pivotal/formats/single_file.py",
        [("state[key] = state[key][: state[key].shape[0] - new_tokens]", "pass")],
        ["tests/test_single_file.py"],
    ),
    (
        "dylora-scale",
        "DyLoRA: a step's truncation to rank b applies its leading ranks at alpha / b",
        "sdxl_pivotal/dylora.py",
        [("layer.mask[:kept] = layer.rank / kept", "layer.mask[:kept] = 1.0")],
        ["tests/test_dylora.py"],
    ),
    (
        "dylora-rows",
        "DyLoRA: a step's truncation to rank b uses (and trains) only the leading b ranks",
        "sdxl_pivotal/dylora.py",
        [("layer.mask[kept:] = 0.0", "layer.mask[kept:] = layer.rank / kept")],
        ["tests/test_dylora.py"],
    ),
    (
        "dylora-step-rank",
        "DyLoRA: each step draws its rank from the seed and the step",
        "sdxl_pivotal/dylora.py",
        [("dylora_rank_rng(seed, step)", "dylora_rank_rng(seed, 0)")],
        ["tests/test_dylora.py"],
    ),
    (
        "dylora-train",
        "DyLoRA: the trainer trains the truncations (not the plain LoRA)",
        "sdxl_pivotal/train.py",
        [("with nested_ranks.training_step(seed, step) if nested_ranks else", "with")],
        ["tests/test_dylora.py"],
    ),
    (
        "dylora-extract-alpha",
        "extract-dylora keeps each module's alpha (the scale the training truncation used)",
        "sdxl_pivotal/tools/extract_dylora.py",
        [('f"{module}.alpha": alpha,', 'f"{module}.alpha": alpha * kept / down.shape[0],')],
        ["tests/test_dylora.py"],
    ),
]

scratch, out = Path(sys.argv[1]), Path(sys.argv[2])
only = set(sys.argv[3:])
results = json.loads(out.read_text()) if out.exists() else {}
env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for key, claim, file, edits, tests in B:
    if (only and key not in only) or (not only and key in results):
        continue
    path = scratch / file
    original = path.read_text()
    text = original
    for old, new in edits:
        assert text.count(old) == 1, (key, old, text.count(old))
        text = text.replace(old, new)
    path.write_text(text)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        failed = [line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        results[key] = {
            "claim": claim,
            "tests": tests,
            "failed": failed,
            "rc": run.returncode,
            "tail": run.stdout.splitlines()[-1:],
        }
    except subprocess.TimeoutExpired:
        results[key] = {"claim": claim, "tests": tests, "failed": [], "rc": "timeout"}
    finally:
        path.write_text(original)
    out.write_text(json.dumps(results, indent=1))
    print(key, results[key]["rc"], results[key]["failed"], flush=True)

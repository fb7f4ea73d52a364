"""The training loop: prepare, then for each optimizer step batch -> latents -> noise -> UNet -> loss ->
backward -> step -> checkpoint. Every detail is one call away in a named module."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .adapters import AdapterPlan, add_adapters, unet_parameters_by_lr_scale
from .card import create_hub_repo, upload_to_hub, write_model_card
from .checkpoints import (
    checkpoint_due,
    load_checkpoint,
    remove_earlier_run,
    remove_expired_epoch_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .class_images import ensure_class_images, generation_dtype, list_images, load_generation_pipeline
from .config import dataset_entries, save_run_config, warn_about_changed_flags
from .data import (
    Batch,
    DreamBoothDataset,
    ImageRecord,
    StepPlan,
    iterate_steps,
    load_entry_records,
    load_records,
    open_image,
)
from .dylora import NestedRanks
from .export import (
    check_writable,
    embeddings_file_name,
    final_output_set,
    output_name,
    remove_temporaries,
    save_safetensors,
)
from .formats import save_diffusers_lora, save_kohya_lora
from .latents import build_latent_cache, scale_latents
from .launch import check_launch_environment, check_process_group
from .losses import (
    diffusion_loss,
    edm_denoised,
    edm_unet_input,
    edm_weights,
    is_edm_scheduler,
    min_snr_weights,
    sample_edm_noise_levels,
    sample_noise,
    sample_timesteps,
    training_target,
)
from .models import SDXLParts, check_mixed_precision, check_model_source, load_sdxl, place_models, trained_models
from .monitor import Requests, TrainingMonitor
from .optim import create_lr_scheduler, create_optimizer, parameter_groups, trainable_parameters
from .plan import log_estimate
from .prompts import PromptEncoder, warn_if_truncated
from .quantization import quantize_frozen_linears
from .rng import drawn_seed, step_seed
from .sample_prompts import is_sample_step, make_samples, read_sample_prompts, with_tokens
from .tokens import PivotalTokens, add_new_tokens, embeddings_state
from .validation import final_validation, is_validation_step, validate_during_training

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def step_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """All randomness of one optimizer step (VAE sampling, noise, timesteps, dropout) derives from
    (seed, step, process): a resumed run draws exactly what the uninterrupted run drew."""
    derived = step_seed(seed, step, process_index)
    torch.manual_seed(derived)  # modules that use the global RNG, such as LoRA dropout
    return torch.Generator().manual_seed(derived)


def batch_loss(
    parts: SDXLParts,
    unet: torch.nn.Module,
    encode_prompts: PromptEncoder,
    batch: Batch,
    generator: torch.Generator,
    args: argparse.Namespace,
    text_trainable: bool = False,
) -> torch.Tensor:
    """The diffusion loss of one batch, with all sampling drawn from `generator`."""
    vae, scheduler = parts.vae, parts.noise_scheduler
    # `module.device`/`.dtype` walk every submodule (~6 ms a step on the tiny model); one weight tells.
    unet_weight = next(parts.unet.parameters())
    device, vae_dtype = unet_weight.device, next(vae.parameters()).dtype
    with torch.no_grad():
        if batch.latent_params is not None:  # --cache_latents: the same posterior, encoded before training
            posterior = DiagonalGaussianDistribution(batch.latent_params.to(device, dtype=vae_dtype))
        else:
            posterior = vae.encode(batch.pixel_values.to(device, dtype=vae_dtype)).latent_dist
        latents = scale_latents(posterior.sample(generator=generator), vae.config)
    latents = latents.to(unet_weight.dtype)

    noise = sample_noise(latents, generator, args.noise_offset)
    edm = args.do_edm_style_training or is_edm_scheduler(scheduler)
    if edm:
        # EDM forward process: x_sigma = x_0 + sigma * noise, scaled by c_in(sigma) for the UNet.
        timesteps, sigmas = sample_edm_noise_levels(scheduler, len(latents), generator, device)
        sigmas = sigmas.to(latents.dtype)
        noisy_latents = latents + sigmas * noise
        unet_input = edm_unet_input(scheduler, noisy_latents, sigmas)
    else:
        # Forward diffusion: x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise.
        timesteps = sample_timesteps(len(latents), scheduler.config.num_train_timesteps, generator, device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        unet_input = noisy_latents

    prompt_embeds, pooled_embeds = encode_prompts(batch.captions, trainable=text_trainable)
    # SDXL micro-conditioning: (original h, w, crop top, left, target h, w) for each image.
    time_ids = batch.time_ids.to(device, dtype=prompt_embeds.dtype)
    prediction = unet(
        unet_input,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": time_ids},
        return_dict=False,
    )[0]

    if edm:  # regress the clean latents through the output preconditioning
        prediction = edm_denoised(scheduler, noisy_latents, prediction, sigmas.to(prediction.dtype))
        target, weights = latents, edm_weights(scheduler, sigmas)
    else:
        target = training_target(scheduler, latents, noise, timesteps)
        weights = min_snr_weights(scheduler, timesteps, args.snr_gamma) if args.snr_gamma else None
    if not batch.num_prior:
        return diffusion_loss(prediction, target, weights)
    # Prior preservation: instance and class images share one UNet call; their losses are weighted apart.
    n = len(latents) - batch.num_prior
    instance_weights, prior_weights = (None, None) if weights is None else (weights[:n], weights[n:])
    instance_loss = diffusion_loss(prediction[:n], target[:n], instance_weights)
    prior_loss = diffusion_loss(prediction[n:], target[n:], prior_weights)
    return instance_loss + args.prior_loss_weight * prior_loss


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    output_dir = Path(args.output_dir)
    report_to = {"none": None, "all": "all"}.get(args.report_to, args.report_to)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    # LyCORIS' module dropout skips whole adapters in a step: DDP must be told that parameters may go unused.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.module_dropout else []
    # Gradient accumulation is explicit in the loop below, so accelerate is told 1.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=report_to, project_config=project, kwargs_handlers=ddp
    )
    check_mixed_precision(accelerator)
    return accelerator


def resolve_seed(args: argparse.Namespace, accelerator: Accelerator, checkpoint: Path | None) -> int:
    """The run's seed: the checkpoint's when resuming, else --seed, else one drawn now (and logged)."""
    from .checkpoints import read_resume_point

    if checkpoint is not None:
        seed = read_resume_point(checkpoint).seed
        if args.seed is not None and args.seed != seed:
            logger.warning("Resuming with the checkpoint's seed %d, not --seed %d.", seed, args.seed)
        return seed
    if args.seed is not None:
        return args.seed
    drawn = [drawn_seed() if accelerator.is_main_process else 0]
    seed = broadcast_object_list(drawn)[0] if accelerator.num_processes > 1 else drawn[0]
    logger.info("No --seed given; using seed %d (recorded in checkpoints).", seed)
    return seed


def tracker_config(args: argparse.Namespace) -> dict:
    """Flags for the trackers: plain values only, and never the Hub token."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in vars(args).items()
        if key not in ("hub_token", "effective_config")
    }


def shared_requests(monitor: TrainingMonitor, accelerator: Accelerator) -> Requests:
    """The main process's control-file requests, the same on every process."""
    requests = [monitor.requests()]
    return broadcast_object_list(requests)[0] if accelerator.num_processes > 1 else requests[0]


def text_training_stop(args: argparse.Namespace, total_steps: int) -> int:
    """Optimizer steps during which text-encoder parameters (new embeddings or LoRA) are trained: the
    first round(frac x total). After it they are frozen, the encoders run without gradients, and each
    distinct caption is encoded once."""
    if args.train_text_encoder_ti:
        return round(args.train_text_encoder_ti_frac * total_steps)
    if args.train_text_encoder:
        return round(args.train_text_encoder_frac * total_steps)
    return 0


def prepare_folders(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Before anything loads: every folder the run writes is writable; the temporaries of killed runs are
    removed (a final output they had completed is moved in); --overwrite_output_dir removes the earlier run."""
    output_dir = Path(args.output_dir)
    folders = {"--output_dir": output_dir}
    if args.report_to != "none":
        folders["--logging_dir"] = output_dir / args.logging_dir
    # Prior preservation from a --datasets class entry reads that folder; --class_data_dir is where images go.
    class_dir = Path(args.class_data_dir) if args.with_prior_preservation and args.class_data_dir else None
    if class_dir is not None and (not class_dir.is_dir() or len(list_images(class_dir)) < args.num_class_images):
        folders["--class_data_dir"] = class_dir  # a folder that holds enough class images is only read
    if args.cache_latents and args.latents_cache_dir:
        folders["--latents_cache_dir"] = Path(args.latents_cache_dir)
    for flag, folder in folders.items():
        check_writable(folder, flag)
    if accelerator.is_main_process:
        images = [output_dir / "validation", output_dir / "samples"]
        subfolders = sorted(p for folder in images if folder.is_dir() for p in folder.iterdir() if p.is_dir())
        ours = [output_dir, *images, *subfolders, *folders.values()]  # where this run writes
        if class_dir is not None:
            ours.append(class_dir)
        for folder in dict.fromkeys(ours):
            remove_temporaries(folder)
        if args.overwrite_output_dir:
            remove_earlier_run(output_dir)
    accelerator.wait_for_everyone()


def output_writer(output_dir: Path, models: dict[str, torch.nn.Module], tokens: PivotalTokens | None, args):
    """A function writing the run's user-facing files into a folder (the output folder or a checkpoint):
    the diffusers LoRA, the embeddings (pivotal tuning) and the kohya file for AUTOMATIC1111 / ComfyUI."""

    def write_outputs(folder: Path) -> None:
        save_run_config(args.effective_config, folder)  # --config FILE reproduces the run
        lora_models = {name: m for name, m in models.items() if hasattr(m, "peft_config")}
        save_diffusers_lora(folder, lora_models)
        embeddings = None
        if tokens is not None:
            embeddings = embeddings_state([models["text_encoder"], models["text_encoder_2"]])
            save_safetensors(embeddings, folder / embeddings_file_name(output_dir))
        save_kohya_lora(
            folder,
            lora_models,
            output_name(output_dir),
            args.pretrained_model_name_or_path,
            embeddings,
            tokens,
            bundle=args.bundle_embeddings,
            # kohya's DyLoRA argument: `tools extract-dylora` reads the step between ranks from the file
            network_args={"unit": str(args.dylora_unit)} if args.adapter == "dylora" else None,
        )

    return write_outputs


def prompts_to_precompute(args, accelerator: Accelerator, dataset: DreamBoothDataset) -> list[str] | None:
    """Every caption training can use, when that is a fixed list and the encoders may leave the device once
    they are frozen; else None. Not with shuffled captions (too many), nor with several processes while the
    encoders are wrapped for distributed training."""
    if args.shuffle_caption:
        return None
    if accelerator.num_processes > 1 and (args.train_text_encoder or args.train_text_encoder_ti):
        return None
    prompts = [r.caption for r in dataset.records] + [r.caption for r in dataset.class_records]
    return prompts + ([""] if args.caption_dropout else [])


def load_class_records(
    args: argparse.Namespace, accelerator: Accelerator, seed: int, tokens: PivotalTokens | None
) -> list[ImageRecord]:
    """Prior preservation: complete --class_data_dir with images of the base model (generated, then freed);
    one record per class image, captioned with --class_prompt. Or the class entries of --datasets, as they are."""
    if dataset_entries(args, "class"):
        records = load_entry_records(args, "class")[0]
        return [replace(r, caption=tokens.substitute(r.caption)) for r in records] if tokens else records
    dtype = generation_dtype(args.prior_generation_precision, accelerator.device)
    paths = ensure_class_images(
        Path(args.class_data_dir),
        args.class_prompt,
        args.num_class_images,
        lambda: load_generation_pipeline(args, accelerator.device, dtype),
        seed=seed,
        resolution=args.resolution,
        batch_size=args.sample_batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        progress=accelerator.is_local_main_process,
    )
    for path in paths:
        open_image(path)  # a corrupt class image fails now, named
    prompt = tokens.substitute(args.class_prompt) if tokens else args.class_prompt
    return [ImageRecord(caption=prompt, path=path) for path in paths]


def build_models(
    args: argparse.Namespace, accelerator: Accelerator, tokens: PivotalTokens | None, seed: int
) -> tuple[SDXLParts, AdapterPlan, torch.dtype]:
    """Load SDXL, attach the adapters and the new tokens, and place everything on the device.
    Returns the parts, the UNet's adapter plan and the dtype of the frozen weights."""
    parts = load_sdxl(args)
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    adapter_plan = prepare_models(parts, args, tokens, seed, accelerator.device, weight_dtype)
    return parts, adapter_plan, weight_dtype


def prepare_models(
    parts: SDXLParts,
    args: argparse.Namespace,
    tokens: PivotalTokens | None,
    seed: int,
    device: torch.device,
    weight_dtype: torch.dtype,
) -> AdapterPlan:
    """Attach the adapters and the new tokens to loaded models, set their training options, and place them on
    `device` (also what the memory planner does to its fake models). Returns the UNet's adapter plan."""
    torch.manual_seed(seed)  # adapter weights start random: same seed, same start
    adapter_plan = add_adapters(parts, args)
    if tokens is not None:
        encoders = [parts.text_encoder, parts.text_encoder_2]
        add_new_tokens([parts.tokenizer, parts.tokenizer_2], encoders, tokens, args.initializer_token)
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if args.train_text_encoder or args.train_text_encoder_ti:
            parts.text_encoder.gradient_checkpointing_enable()
            parts.text_encoder_2.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        parts.unet.enable_xformers_memory_efficient_attention()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    place_models(parts, device, weight_dtype, vae_fp32=not args.pretrained_vae_model_name_or_path)
    if args.channels_last:
        parts.unet.to(memory_format=torch.channels_last)
    if args.quantize_unet != "no":  # after the adapters (their A and B stay float32) and the dtype
        quantize_frozen_linears(parts.unet, args.quantize_unet)
    if args.compile:
        parts.unet.compile_repeated_blocks()  # each transformer block compiled once, reused by all its copies
    return adapter_plan


def train(args: argparse.Namespace) -> Path:
    """Run the training `args` describe; return the output folder."""
    output_dir = Path(args.output_dir)
    check_launch_environment()
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_process_group(accelerator)
    prepare_folders(args, accelerator)
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.info("No checkpoint in %s; starting a new run.", output_dir)
    if checkpoint is not None and accelerator.is_main_process:
        warn_about_changed_flags(checkpoint, args.effective_config)
    seed = resolve_seed(args, accelerator, checkpoint)
    repo_id = create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None

    # Data first: bad images fail here, before minutes of model loading.
    # --datasets: several folders, each at its own size; else one source at --resolution (or its buckets).
    records, sizes = load_entry_records(args, "instance") if args.datasets else (load_records(args), None)
    tokens = None
    if args.train_text_encoder_ti:
        tokens = PivotalTokens.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)
        tokens.warn_if_unused([record.caption for record in records])
        records = [replace(record, caption=tokens.substitute(record.caption)) for record in records]
        logger.info("Pivotal tuning: %s", tokens.by_abstraction)
    check_model_source(args)  # a missing part or an unreachable Hub id fails now, before anything loads
    class_records = load_class_records(args, accelerator, seed, tokens) if args.with_prior_preservation else None
    dataset = DreamBoothDataset(records, args, seed, class_records)
    if sizes is not None:
        dataset.sizes = sizes
    validation_prompt = args.validation_prompt
    if tokens is not None and validation_prompt:
        validation_prompt = tokens.substitute(validation_prompt)
    samples = with_tokens(read_sample_prompts(args.sample_prompts), tokens) if args.sample_prompts else []
    plan = StepPlan(
        len(dataset),
        args.train_batch_size,
        args.gradient_accumulation_steps,
        seed,
        accelerator.num_processes,
        accelerator.process_index,
        groups=[dataset.sizes[i % len(records)] for i in range(len(dataset))],
    )
    total_steps = args.max_train_steps or args.num_train_epochs * plan.steps_per_epoch
    num_epochs = math.ceil(total_steps / plan.steps_per_epoch)
    text_encoder_stop = text_training_stop(args, total_steps)

    if args.memory_plan and accelerator.device.type == "cuda" and accelerator.is_local_main_process:
        log_estimate(args, accelerator.device)  # before minutes of loading: does it fit?
    parts, adapter_plan, weight_dtype = build_models(args, accelerator, tokens, seed)
    if accelerator.is_main_process:  # (shuffling tags keeps a caption's length)
        captions = [r.caption for r in dataset.records] + [r.caption for r in dataset.class_records]
        warn_if_truncated(parts.tokenizer, captions, args.max_token_length)
    if args.cache_latents:
        cache_dir = Path(args.latents_cache_dir) if args.latents_cache_dir else None
        dataset.latent_cache = build_latent_cache(dataset, parts.vae, cache_dir, args.train_batch_size)
        parts.vae.to("cpu")  # needed again only to decode validation images
    models = trained_models(parts, args)
    nested_ranks = NestedRanks(models.values(), args.dylora_unit) if args.adapter == "dylora" else None

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    text_params = [p for name, m in models.items() if name != "unet" for p in trainable_parameters(m)]
    groups = parameter_groups(args, unet_parameters_by_lr_scale(parts.unet, adapter_plan), text_params)
    optimizer = create_optimizer(args, groups)
    lr_scheduler = create_lr_scheduler(args, optimizer, total_steps)

    prepared = accelerator.prepare(*models.values(), optimizer)
    wrapped = dict(zip(models, prepared[:-1], strict=True))
    optimizer = prepared[-1]
    encode_prompts = PromptEncoder(
        [parts.tokenizer, parts.tokenizer_2],
        [wrapped.get(n, getattr(parts, n)) for n in ("text_encoder", "text_encoder_2")],
        args.clip_skip,
        cache=not args.shuffle_caption,
        max_token_length=args.max_token_length,
    )

    unwrapped = {name: accelerator.unwrap_model(m) for name, m in wrapped.items()}
    write_outputs = output_writer(output_dir, unwrapped, tokens, args)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, models, optimizer, lr_scheduler, accelerator.scaler).step
        logger.info("Resumed from %s at step %d.", checkpoint, start_step)
    if accelerator.is_main_process:
        save_run_config(args.effective_config, output_dir)
        accelerator.init_trackers("dreambooth-lora-sd-xl", config=tracker_config(args))

    logger.info(
        "%d images x %d repeats, %d optimizer steps (%d per epoch, %d epochs), "
        "batch %d x %d accumulation x %d processes",
        len(dataset.records),
        args.repeats,
        total_steps,
        plan.steps_per_epoch,
        num_epochs,
        args.train_batch_size,
        args.gradient_accumulation_steps,
        accelerator.num_processes,
    )
    progress = tqdm(total=total_steps, initial=start_step, desc="steps", disable=not accelerator.is_local_main_process)
    for model in wrapped.values():
        model.train()

    precompute = prompts_to_precompute(args, accelerator, dataset)
    images_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    monitor = TrainingMonitor(output_dir, images_per_step, enabled=accelerator.is_main_process)
    monitor.start(start_step, total_steps)
    stopped = False
    for step, micro_batches in iterate_steps(dataset, plan, start_step, args.dataloader_num_workers):
        if step >= total_steps:
            break
        monitor.step_started()
        generator = step_generator(seed, step, accelerator.process_index)
        text_trainable = step < text_encoder_stop
        if not text_trainable and precompute is not None and not encode_prompts.offloaded:
            encode_prompts.encode_all_then_offload(precompute)
        step_loss = 0.0
        # --adapter dylora: this step's forward and backward passes use one truncation of the adapters.
        with nested_ranks.training_step(seed, step) if nested_ranks else contextlib.nullcontext():
            for i, batch in enumerate(micro_batches):
                # Only the last micro-batch of a step synchronises gradients across processes.
                with contextlib.ExitStack() as stack:
                    if i < len(micro_batches) - 1:
                        for model in wrapped.values():
                            stack.enter_context(accelerator.no_sync(model))
                    loss = batch_loss(parts, wrapped["unet"], encode_prompts, batch, generator, args, text_trainable)
                    accelerator.backward(loss / len(micro_batches))
                step_loss += loss.detach().item() / len(micro_batches)
        if args.max_grad_norm > 0:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        lr = lr_scheduler.get_last_lr()[0]
        accelerator.log(monitor.step_done(done, step_loss, lr, epoch=step // plan.steps_per_epoch), step=done)
        requests = shared_requests(monitor, accelerator)  # control files: stop / save / sample now
        due = checkpoint_due(args, done, plan.steps_per_epoch)
        if accelerator.is_main_process and (due or requests.save or requests.stop):
            save_checkpoint(
                output_dir,
                done,
                seed,
                unwrapped,
                optimizer,
                lr_scheduler,
                write_outputs,
                accelerator.scaler,
                args.checkpoints_total_limit,
            )
            remove_expired_epoch_checkpoint(output_dir, args, done, plan.steps_per_epoch)
        sample = requests.sample and bool(validation_prompt)
        if accelerator.is_main_process and (sample or is_validation_step(args, done, plan.steps_per_epoch)):
            validate_during_training(accelerator, parts, unwrapped, args, validation_prompt, seed, done)
        sample_now = bool(samples) and (requests.sample or is_sample_step(args, done, plan.steps_per_epoch))
        if accelerator.is_main_process and sample_now:  # --sample_prompts: kohya's sample images
            make_samples(accelerator, parts, unwrapped, args, samples, seed, done)
        if requests.stop and done < total_steps:
            stopped = True
            break
    progress.close()

    accelerator.wait_for_everyone()
    if stopped:
        logger.info("Stopped on request after step %d; resume with --resume_from_checkpoint latest.", done)
        monitor.event("stopped", done)
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        # Written as one set: a kill leaves it complete, or recognisably incomplete (no LoRA file).
        with final_output_set(output_dir) as staging:
            write_outputs(staging)
            images = []
            if validation_prompt:
                images = final_validation(
                    accelerator, args, staging, validation_prompt, seed, total_steps, weight_dtype
                )
            images = [output_dir / image.relative_to(staging) for image in images]  # where they are moved to
            write_model_card(staging, args, tokens, images, repo_id)
        logger.info("Saved the LoRA%s to %s", " and embeddings" if tokens else "", output_dir)
        if repo_id:
            upload_to_hub(output_dir, args, repo_id)
            logger.info("Uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
        monitor.event("finished", total_steps)
    accelerator.end_training()
    return output_dir

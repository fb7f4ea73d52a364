"""Memory planner: the peak GPU memory a training command will need, before anything is loaded.

    python -m sdxl_pivotal.plan --gpu_memory 12 \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_prompt "a photo of TOK dog" --resolution 1024 --train_batch_size 1 --mixed_precision bf16 ...

How: the models are built from their configs (embedded for SDXL base: `sdxl_pivotal/configs`, else the model
folder's) as fake tensors (`torch._subclasses.FakeTensorMode`: shapes and dtypes, no storage, no compute), then the
trainer's own code runs on them: `prepare_models` (adapters from the real adapter plan, new tokens, checkpointing,
dtypes), the optimizer over the real parameter groups, and two training steps of `batch_loss` (VAE encoding,
text encoders, UNet forward and backward, clipping, optimizer step), all under torch's `MemTracker`, which
records the bytes of every live tensor. Its peak is the estimate of `torch.cuda.max_memory_allocated()`.

Known differences from a GPU run, each a term of the estimate or a stated limit:
- the fake run uses CPU kernels (CPU flash attention, like CUDA's, keeps no attention matrix), CPU autocast;
- 8-bit AdamW and Prodigy states are sized by formula (2 and 16 bytes per trainable number; AdamW: 8, measured);
- the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack are not tensors: the fit check adds
  `CONTEXT_GIB` and `FRAGMENTATION` to the peak (guesses until calibrated on a GPU, see benchmarks/README.md);
- class-image generation (prior preservation with missing class images) runs before training and is not sized.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import weakref
from dataclasses import dataclass, field

import torch

from .args import build_parser
from .configs import config_source, models_from_configs
from .quantization import inner_tensors

logger = logging.getLogger(__name__)

GIB = 2**30
CONTEXT_GIB = 0.6  # CUDA context + library workspaces, outside the caching allocator (a guess)
FRAGMENTATION = 0.10  # reserved / allocated - 1 of the caching allocator (a guess)
# Optimizer state per trainable number, bytes; AdamW's is measured by the fake run, the others replace it.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}


@dataclass
class MemoryEstimate:
    """Peak GPU memory of a command, in bytes, and what it is made of."""

    peak: int  # estimate of torch.cuda.max_memory_allocated()
    weights: int  # all parameters and buffers on the device before training (frozen and trainable)
    trainable_numbers: int
    optimizer_state_bytes: int  # per trainable number
    weight_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def needed(self) -> float:
        """GiB the GPU must have free: the peak plus allocator slack and the CUDA context."""
        return self.peak * (1 + FRAGMENTATION) / GIB + CONTEXT_GIB

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.needed <= gpu_memory_gib

    def summary(self) -> str:
        state = self.trainable_numbers * (4 + self.optimizer_state_bytes)  # fp32 gradients and optimizer state
        rest = self.peak - self.weights - state
        kinds = (
            f"weights {self.weights / GIB:.2f}, gradients + optimizer {state / GIB:.2f}, "
            f"activations and temporaries {rest / GIB:.2f}"
        )
        return (
            f"estimated peak GPU memory {self.peak / GIB:.2f} GiB allocated ({kinds}); "
            f"needs about {self.needed:.1f} GiB free with the CUDA context and allocator slack"
        )


@dataclass(frozen=True)
class Change:
    """A change of flags that lowers memory, and what it costs."""

    name: str
    cost: str
    apply: object  # Callable[[Namespace], Namespace | None]: the changed flags, or None when it does not apply


def _with(**flags):
    def apply(args: argparse.Namespace) -> argparse.Namespace | None:
        if all(getattr(args, key) == value for key, value in flags.items()):
            return None
        return replace_args(args, **flags)

    return apply


def _halve_batch(args: argparse.Namespace) -> argparse.Namespace | None:
    if args.train_batch_size < 2:
        return None
    return replace_args(
        args,
        train_batch_size=args.train_batch_size // 2,
        gradient_accumulation_steps=args.gradient_accumulation_steps * 2,
    )


def _quantize_unet(args: argparse.Namespace) -> argparse.Namespace | None:
    return replace_args(args, quantize_unet="int8") if args.quantize_unet == "no" else None


# Cheapest first: the planner proposes the first that fits, else the shortest cheapest-first combination.
CHANGES = (
    Change(
        "--use_8bit_adam",
        "no speed cost; 8-bit optimizer moments (bitsandbytes, CUDA)",
        _with(use_8bit_adam=True, adam_fused=False),
    ),
    Change(
        "--cache_latents",
        "no speed cost; each image's crop is fixed for the run; VAE off the GPU",
        _with(cache_latents=True),
    ),
    Change("--gradient_checkpointing", "about 20-30% slower steps", _with(gradient_checkpointing=True)),
    Change(
        "--quantize_unet int8",
        "the frozen UNet's Linear weights rounded to int8 (the LoRA learns on them; results change slightly); "
        "needs torchao",
        _quantize_unet,
    ),
    Change(
        "half the batch, twice the accumulation",
        "same effective batch, slower (less parallel work per step)",
        _halve_batch,
    ),
)


def replace_args(args: argparse.Namespace, **flags) -> argparse.Namespace:
    changed = copy.copy(args)
    for key, value in flags.items():
        setattr(changed, key, value)
    return changed


def parse_plan_args(argv: list[str]) -> tuple[float | None, argparse.Namespace]:
    """(--gpu_memory in GiB or None, the trainer's flags) from a command line; data folders need not exist yet."""
    gpu_memory = None
    if "--gpu_memory" in argv:
        at = argv.index("--gpu_memory")
        gpu_memory = float(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    args = build_parser().parse_args(argv)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.conv_alpha is None:
        args.conv_alpha = float(args.conv_rank)
    return gpu_memory, args


def _tokenizers(source):
    """The model's own tokenizers when its folder has them, else the embedded ones (ids only matter here)."""
    from transformers import AutoTokenizer

    from .tiny import build_clip_tokenizers

    try:
        return (
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer", use_fast=False),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", use_fast=False),
        )
    except (OSError, ValueError):
        return build_clip_tokenizers()


def _replace_tensors(module: torch.nn.Module, device: torch.device) -> None:
    """Give every parameter and buffer of `module` a new empty tensor on `device` (same shape, dtype and
    requires_grad; tied tensors stay tied), assigned directly rather than through `Module.to`."""
    new: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, tensor in list(sub._parameters.items()):
            if tensor is not None:
                if id(tensor) not in new:
                    empty = _empty_like(tensor, device)
                    new[id(tensor)] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                sub._parameters[name] = new[id(tensor)]
        for name, tensor in list(sub._buffers.items()):
            if tensor is not None:
                sub._buffers[name] = new.setdefault(id(tensor), _empty_like(tensor, device))


def _empty_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An empty tensor of `tensor`'s shape and dtype on `device`; a tensor subclass (a weight --quantize_unet
    stored in int8 or fp8) is rebuilt from empty components of its own shapes and dtypes."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    names, context = tensor.__tensor_flatten__()
    parts = {name: _empty_like(getattr(tensor, name), device) for name in names}
    return type(tensor).__tensor_unflatten__(parts, context, tensor.shape, tensor.stride())


class LiveTensorBytes:
    """Bytes of all live tensor storages on one device, and their peak: a dispatch mode sees every tensor an op
    creates (forward, backward, optimizer); a storage is counted once and released when it is freed. What the CUDA
    caching allocator reports as allocated, less its rounding."""

    def __init__(self, device: torch.device):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.device, self.live, self.peak = device, 0, 0
        self._seen = torch.utils.weak.WeakIdKeyDictionary()
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in torch.utils._pytree.tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        tracker.add(tensor)
                return out

        self.mode = Mode()

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            return
        if hasattr(tensor, "__tensor_flatten__"):  # a quantised weight: its values and scales hold the memory
            for part in inner_tensors(tensor):
                self.add(part)
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.live -= size


def _resize_like_the_model(encoder: torch.nn.Module, tokenizer) -> None:
    """Make `add_new_tokens` resize this meta encoder's embedding as it would the real one: to its vocabulary plus
    the new tokens (the embedded tokenizers are smaller than the model's vocabulary), without mean-initialising
    the new rows (that reads values, which meta tensors do not have)."""
    resize = encoder.resize_token_embeddings
    missing = encoder.config.vocab_size - len(tokenizer)

    def resize_token_embeddings(new_num_tokens: int, **kwargs):
        return resize(new_num_tokens + max(missing, 0), mean_resizing=False)

    encoder.resize_token_embeddings = resize_token_embeddings


def _fake_batch(args: argparse.Namespace, prompt: str, num_prior: int):
    from .data import Batch

    count = args.train_batch_size + num_prior
    size = args.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * count, dtype=torch.float32)
    latent = (count, 8, size // 8, size // 8)  # --cache_latents: posterior mean and log-variance
    return Batch(
        pixel_values=None if args.cache_latents else torch.zeros(count, 3, size, size),
        captions=[prompt] * count,
        time_ids=time_ids,
        num_prior=num_prior,
        latent_params=torch.zeros(latent) if args.cache_latents else None,
    )


def estimate(args: argparse.Namespace) -> MemoryEstimate:
    """The peak GPU memory of training with `args` (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .adapters import unet_parameters_by_lr_scale
    from .models import SDXLParts, load_noise_scheduler, trained_models
    from .optim import create_optimizer, parameter_groups, trainable_parameters
    from .prompts import PromptEncoder
    from .tokens import PivotalTokens
    from .train import WEIGHT_DTYPES, batch_loss, prepare_models, step_generator

    source = config_source(args.pretrained_model_name_or_path)
    weight_dtype = WEIGHT_DTYPES.get(args.mixed_precision, torch.float32)
    # The fake run measures AdamW's state; other optimizers are corrected by formula below.
    # --compile and --channels_last change speed, not sizes (and compiling fake modules would only cost time).
    fake_args = replace_args(
        args,
        optimizer="adamw",
        use_8bit_adam=False,
        adam_fused=False,
        compile=False,
        channels_last=False,
        pretrained_model_name_or_path=str(source),
    )
    scheduler = load_noise_scheduler(fake_args, {"revision": args.revision, "cache_dir": args.cache_dir})
    tokenizers = _tokenizers(source)
    tokens = None
    prompt = args.instance_prompt
    if args.train_text_encoder_ti:
        tokens = PivotalTokens.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)
        prompt = tokens.substitute(prompt)
    num_prior = args.train_batch_size if args.with_prior_preservation else 0
    device = torch.device("cpu")
    # Modules are built and prepared on `meta` (module conversions such as `.to(dtype)` cannot swap fake
    # parameters), then every parameter and buffer becomes a fake CPU tensor of the same shape and dtype.
    with torch.device("meta"):
        models = models_from_configs(source, args.pretrained_vae_model_name_or_path)
    for model in models.values():
        model.requires_grad_(False)
    parts = SDXLParts(
        *tokenizers, models["text_encoder"], models["text_encoder_2"], models["vae"], models["unet"], scheduler
    )
    for encoder, tokenizer in zip((parts.text_encoder, parts.text_encoder_2), tokenizers, strict=True):
        _resize_like_the_model(encoder, tokenizer)
    meta = torch.device("meta")
    adapter_plan = prepare_models(parts, fake_args, tokens, 0, meta, weight_dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for model in models.values():
            _replace_tensors(model, device)
        trained = trained_models(parts, fake_args)
        text_params = [p for name, m in trained.items() if name != "unet" for p in trainable_parameters(m)]
        unet_groups = unet_parameters_by_lr_scale(parts.unet, adapter_plan)
        optimizer = create_optimizer(fake_args, parameter_groups(fake_args, unet_groups, text_params))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable_numbers = sum(p.numel() for p in params)
        batch = _fake_batch(args, prompt, num_prior)
        text_trainable = bool(args.train_text_encoder or args.train_text_encoder_ti)
        encode_prompts = PromptEncoder(
            list(tokenizers),
            [parts.text_encoder, parts.text_encoder_2],
            args.clip_skip,
            cache=not args.shuffle_caption,
            max_token_length=args.max_token_length,
        )
        autocast = (
            torch.autocast("cpu", dtype=weight_dtype) if weight_dtype != torch.float32 else contextlib.nullcontext()
        )
        tracker = LiveTensorBytes(device)
        for model in models.values():
            for tensor in (*model.parameters(), *model.buffers()):
                tracker.add(tensor)
        weight_bytes = tracker.live
        with tracker.mode:
            if args.cache_latents:  # the caching phase, then the VAE leaves the device
                with torch.no_grad():
                    vae_dtype = next(parts.vae.parameters()).dtype
                    size = args.resolution
                    parts.vae.encode(torch.zeros(args.train_batch_size, 3, size, size, dtype=vae_dtype))
                _replace_tensors(parts.vae, meta)
            for step in range(2):  # the second step holds the optimizer state from the first
                generator = step_generator(0, step, 0)
                with autocast:
                    loss = batch_loss(parts, parts.unet, encode_prompts, batch, generator, fake_args, text_trainable)
                loss.backward()
                if args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del loss
    peak = tracker.peak
    notes = []
    optimizer_name = "prodigy" if args.optimizer == "prodigy" else "adamw8bit" if args.use_8bit_adam else "adamw"
    correction = (OPTIMIZER_STATE_BYTES[optimizer_name] - OPTIMIZER_STATE_BYTES["adamw"]) * trainable_numbers
    if correction:
        peak += correction
        notes.append(f"{optimizer_name} state sized as {OPTIMIZER_STATE_BYTES[optimizer_name]} bytes per number")
    if args.with_prior_preservation:
        notes.append("class-image generation (when class images are missing) is not included")
    state_bytes = OPTIMIZER_STATE_BYTES[optimizer_name]
    return MemoryEstimate(peak, weight_bytes, trainable_numbers, state_bytes, weight_dtype, notes)


def propose(args: argparse.Namespace, gpu_memory_gib: float) -> list[tuple[list[Change], MemoryEstimate]]:
    """The least costly changes that make `args` fit: the first single change (cheapest first) that fits; else
    changes added cheapest first until it fits. Empty when nothing here makes it fit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    candidates = [(change, change.apply(args)) for change in CHANGES]
    candidates = [(change, changed) for change, changed in candidates if changed is not None]
    if not candidates:
        return []
    # The single changes are estimated side by side, one CPU process each (a minute each at SDXL size).
    with ProcessPoolExecutor(len(candidates), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(estimate, [changed for _, changed in candidates]))
    for (change, _), result in zip(candidates, results, strict=True):
        if result.fits(gpu_memory_gib):
            return [([change], result)]
    applied, current = [], args
    while True:
        step = next(((c, c.apply(current)) for c in CHANGES if c.apply(current) is not None), None)
        if step is None:
            return []
        applied.append(step[0])
        current = step[1]
        result = estimate(current)
        if result.fits(gpu_memory_gib):
            return [(applied, result)]


def describe_plan(args: argparse.Namespace, gpu_memory_gib: float | None) -> str:
    """The report `python -m sdxl_pivotal.plan` prints."""
    result = estimate(args)
    lines = [
        f"{args.pretrained_model_name_or_path} at {args.resolution} px, batch {args.train_batch_size}"
        + (" + class images" if args.with_prior_preservation else "")
        + f", weights {str(result.weight_dtype).removeprefix('torch.')}, "
        f"{result.trainable_numbers:,} trainable numbers",
        result.summary(),
        *(f"note: {note}" for note in result.notes),
    ]
    if gpu_memory_gib is None:
        return "\n".join(lines)
    if result.fits(gpu_memory_gib):
        lines.append(f"fits in {gpu_memory_gib:g} GiB")
        return "\n".join(lines)
    lines.append(f"does NOT fit in {gpu_memory_gib:g} GiB")
    proposals = propose(args, gpu_memory_gib)
    if not proposals:
        lines.append("no combination of --use_8bit_adam, --cache_latents, --gradient_checkpointing, --quantize_unet")
        lines.append("int8 and a smaller batch fits; lower --resolution or use a larger GPU")
    for changes, changed in proposals:
        lines.append(f"it fits with: {' + '.join(c.name for c in changes)} -> {changed.needed:.1f} GiB")
        lines += [f"  {c.name}: {c.cost}" for c in changes]
    return "\n".join(lines)


def log_estimate(args: argparse.Namespace, device: torch.device) -> None:
    """At the start of a CUDA run: log the estimate, and warn when it exceeds the GPU's free memory (where Windows
    drivers would silently spill into shared memory, 10-100x slower, instead of failing)."""
    try:
        with torch.random.fork_rng(devices=[]):  # the fake steps draw random numbers: leave the run's RNG as it was
            result = estimate(args)
    except Exception as error:  # the planner must never stop a training run
        logger.warning("Memory planner failed (%s: %s); training anyway.", type(error).__name__, error)
        return
    free, total = torch.cuda.mem_get_info(device)
    logger.info("Memory plan: %s.", result.summary())
    if result.needed > free / GIB:
        logger.warning(
            "The estimated %.1f GiB exceed the %.1f GiB free on %s (of %.1f GiB): training may run out of memory, "
            "or spill into shared memory and crawl. `python -m sdxl_pivotal.plan --gpu_memory %.0f <your flags>` "
            "proposes changes that fit.",
            result.needed,
            free / GIB,
            torch.cuda.get_device_name(device),
            total / GIB,
            free / GIB,
        )


def main(argv: list[str] | None = None) -> None:
    gpu_memory, args = parse_plan_args(sys.argv[1:] if argv is None else argv)
    print(describe_plan(args, gpu_memory))


if __name__ == "__main__":
    main()

"""Load any file we write into a diffusers SDXL pipeline: `load_for_diffusers(pipe, folder_or_file)`.

diffusers' `load_lora_weights` refuses a kohya file with bundled embeddings (`bundle_emb.*` keys), drops a kohya
file's DoRA magnitudes (`dora_scale`) and per-module alphas, and, with transformers 5, leaves the text encoders'
DoRA magnitudes of any file at their initial values; it reads no LoHa, LoKr or (IA)³. Here every file becomes PEFT
state with its exact config (a kohya file through `kohya_to_peft`); LoRA goes to diffusers' per-model loaders, LoHa,
LoKr and (IA)³ to PEFT; embeddings (bundled, or an `_emb` file) go through `load_textual_inversion` for both encoders.
Text-encoder module paths of either transformers layout (with or without `text_model.`) are mapped onto the
installed one.

This is the one loader of our outputs: final validation, `examples/generate.py` and the model card's code use it
(where diffusers' own `load_lora_weights` does exactly the same, `diffusers_reads_exactly`, the card prints that).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..export import LORA_WEIGHTS_NAME
from ..tokens import EMBEDDING_KEYS, PivotalTokens, pool_at_end_of_text
from .diffusers_lora import TEXT_ENCODER_PARTS, config_metadata, diffusers_lora_metadata, diffusers_to_peft
from .families import PeftLora
from .kohya import BUNDLE_PREFIX, TOKENS_METADATA_KEY, kohya_to_peft, split_bundled_embeddings
from .names import KOHYA_PREFIXES

TEXT_ENCODERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}


def load_for_diffusers(pipe, folder_or_file: str | Path, adapter_name: str | None = None) -> list[str]:
    """Load our LoRA and embeddings into `pipe` (a diffusers SDXL pipeline); return the new tokens to prompt with.

    A folder (the output folder or a checkpoint) loads its `pytorch_lora_weights.safetensors` and
    `*_emb.safetensors`; a file is recognised by its keys: diffusers LoRA, kohya LoRA (with or without bundled
    embeddings) or embeddings file.
    """
    path = Path(folder_or_file)
    if path.is_dir():
        tokens = []
        for file in [path / LORA_WEIGHTS_NAME, *sorted(path.glob("*_emb.safetensors"))]:
            tokens += load_for_diffusers(pipe, file, adapter_name)
        return tokens
    state, metadata = read_safetensors(path)
    if lora_file_format(state) == "embeddings":
        return load_embeddings(pipe, state, token_strings(metadata, len(state["clip_l"])))
    loras = peft_loras(state, metadata, {part: getattr(pipe, part) for part in KOHYA_PREFIXES})
    load_adapters(pipe, loras, adapter_name)
    _, bundles = split_bundled_embeddings(state)
    tokens = []
    for embeddings in bundles.values():
        tokens += load_embeddings(pipe, embeddings, token_strings(metadata, len(embeddings["clip_l"])))
    return tokens


def lora_file_format(state: Mapping[str, torch.Tensor]) -> str:
    """What a file of ours holds, by its keys: "embeddings" (an `_emb` file), "kohya" (kohya keys, maybe with
    bundled embeddings) or, for anything else, "diffusers"."""
    if set(state) == set(EMBEDDING_KEYS):
        return "embeddings"
    lora, _ = split_bundled_embeddings(state)
    return "kohya" if all(key.startswith(tuple(KOHYA_PREFIXES.values())) for key in lora) else "diffusers"


def peft_loras(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], models: Mapping[str, torch.nn.Module]
) -> dict[str, PeftLora]:
    """A LoRA file's adapters (diffusers or kohya keys; bundled embeddings left out) as PEFT adapters of `models`
    ({part: model}), by part."""
    lora, _ = split_bundled_embeddings(state)
    if lora_file_format(state) == "kohya":
        return kohya_to_peft(lora, models, metadata)
    return diffusers_to_peft(lora, metadata, models)


def lora_file_parts(path: Path) -> set[str]:
    """The pipeline parts ("unet", "text_encoder", "text_encoder_2") a LoRA file adapts, from its keys alone (no
    tensor is read). ValueError for a file that holds no LoRA (an embeddings file, or other keys)."""
    with safe_open(str(path), framework="pt") as file:
        keys = [key for key in file.keys() if not key.startswith(f"{BUNDLE_PREFIX}.")]  # noqa: SIM118 (not iterable)
    by_prefix = {prefix: part for part, prefix in KOHYA_PREFIXES.items()}
    parts = set()
    for key in keys:
        first = key.split(".", 1)[0]
        part = next((p for prefix, p in by_prefix.items() if first.startswith(prefix + "_")), first)
        if part not in KOHYA_PREFIXES:
            raise ValueError(f"{path} holds no LoRA of an SDXL pipeline (its key {key!r} is not one).")
        parts.add(part)
    if not parts:
        raise ValueError(f"{path} holds no LoRA tensors.")
    return parts


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    return load_file(path), metadata


def diffusers_reads_exactly(path: Path) -> bool:
    """Whether diffusers' `load_lora_weights` gives our diffusers LoRA file at `path` the weights
    `load_for_diffusers` gives it: LoRA (with or without DoRA) in every part, but no DoRA in a text encoder
    (transformers 5's `load_adapter` leaves those magnitudes at their initial values); not LoHa, LoKr or (IA)³, which
    diffusers does not read."""
    with safe_open(str(path), framework="pt") as file:
        configs = diffusers_lora_metadata(file.metadata() or {}) or {}
    for key, value in configs.items():
        part, field = key.split(".", 1)
        if field == "peft_type" and value != "LORA":
            return False
        if field == "use_dora" and value and part in TEXT_ENCODER_PARTS:
            return False
    return True


def load_adapters(pipe, loras: Mapping[str, PeftLora], adapter_name: str | None) -> None:
    """Load PEFT adapters ({part: PeftLora}) into `pipe`: LoRA through diffusers' loaders, as `load_lora_weights`
    does (so `set_adapters` and `fuse_lora` know it); LoHa, LoKr and (IA)³, which diffusers' loaders do not read, with
    PEFT directly.

    transformers 5's `load_adapter` drops a bare `x.lora_magnitude_vector` (DoRA's magnitudes would keep their
    initial values) but reads `x.lora_magnitude_vector.weight`, as PEFT does; so the magnitudes go by that name.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    for part, lora in loras.items():
        model = getattr(pipe, part)
        if lora.config.peft_type.value != "LORA":
            name = adapter_name or "default"
            inject_adapter_in_model(lora.config, model, adapter_name=name)
            set_peft_model_state_dict(model, lora.state, adapter_name=name)
            continue
        state = {f"{part}.{_magnitude_key(key)}": value for key, value in lora.state.items()}
        common = dict(
            network_alphas=None,
            adapter_name=adapter_name,
            metadata={f"{part}.{key}": value for key, value in config_metadata(part, lora.config).items()},
            _pipeline=pipe,
        )
        if part == "unet":
            pipe.load_lora_into_unet(state, unet=model, **common)
        else:
            pipe.load_lora_into_text_encoder(state, text_encoder=model, prefix=part, **common)


def _magnitude_key(key: str) -> str:
    return f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key


def load_embeddings(pipe, embeddings: Mapping[str, torch.Tensor], tokens: list[str]) -> list[str]:
    """{"clip_l": [n, 768], "clip_g": [n, 1280]} as the new `tokens` of both tokenizers and encoders."""
    for key, (encoder, tokenizer) in TEXT_ENCODERS.items():
        pipe.load_textual_inversion(
            embeddings[key], token=tokens, text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, tokenizer)
        )
        pool_at_end_of_text(getattr(pipe, encoder), getattr(pipe, tokenizer))  # as in training
    return tokens


def token_strings(metadata: Mapping[str, str], count: int) -> list[str]:
    """The tokens a file records, else the trainer's own numbering (`<s0>`, `<s1>`, ...)."""
    if TOKENS_METADATA_KEY in metadata:
        tokens = PivotalTokens(json.loads(metadata[TOKENS_METADATA_KEY])).all_tokens
    else:
        tokens = PivotalTokens.from_flags("TOK", count).all_tokens
    if len(tokens) != count:
        raise ValueError(f"{count} embedding rows for {len(tokens)} tokens {tokens}.")
    return tokens

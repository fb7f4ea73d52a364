"""Load any file we write into a diffusers SDXL pipeline: `load_for_diffusers(pipe, folder_or_file)`.

diffusers' `load_lora_weights` refuses a kohya file with bundled embeddings (`bundle_emb.*` keys), drops a kohya
file's DoRA magnitudes (`dora_scale`) and per-module alphas, and, with transformers 5, leaves the text encoders'
DoRA magnitudes of any file at their initial values. Here every LoRA goes to diffusers' per-model loaders as PEFT
state with its exact LoRA config (a kohya file through `kohya_to_peft`), and embeddings (bundled, or an `_emb`
file) go through `load_textual_inversion` for both encoders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..export import LORA_WEIGHTS_NAME
from ..tokens import EMBEDDING_KEYS, PivotalTokens
from .diffusers_lora import diffusers_lora_metadata
from .kohya import TOKENS_METADATA_KEY, kohya_to_peft, split_bundled_embeddings
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
    file_format = lora_file_format(state)
    if file_format == "embeddings":
        return load_embeddings(pipe, state, token_strings(metadata, len(state["clip_l"])))
    lora, bundles = split_bundled_embeddings(state)
    if file_format == "kohya":
        lora, lora_metadata = kohya_for_diffusers(pipe, lora)
    else:
        lora_metadata = diffusers_lora_metadata(metadata)
    load_lora(pipe, lora, lora_metadata, adapter_name)
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    return load_file(path), metadata


def kohya_for_diffusers(pipe, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A kohya LoRA (without embeddings) as diffusers holds a LoRA file: PEFT state under each part's prefix,
    and each part's LoRA config under the same prefix."""
    loras = kohya_to_peft(state, {part: getattr(pipe, part) for part in KOHYA_PREFIXES})
    prefixed = {f"{part}.{key}": value for part, lora in loras.items() for key, value in lora.state.items()}
    metadata = {f"{part}.{key}": value for part, lora in loras.items() for key, value in lora.config.to_dict().items()}
    return prefixed, metadata


def load_lora(pipe, state: Mapping[str, torch.Tensor], metadata: dict | None, adapter_name: str | None) -> None:
    """Load LoRA `state` (keys prefixed by part) with its `metadata` into `pipe`, as `load_lora_weights` does.

    transformers 5's `load_adapter` drops a bare `x.lora_magnitude_vector` (DoRA's magnitudes would keep their
    initial values) but reads `x.lora_magnitude_vector.weight`, as PEFT does; so the magnitudes go by that name.
    """
    state = {_magnitude_key(key): value for key, value in state.items()}
    common = dict(network_alphas=None, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe)
    if any(key.startswith("unet.") for key in state):
        pipe.load_lora_into_unet(state, unet=pipe.unet, **common)
    for part in ("text_encoder", "text_encoder_2"):
        if any(key.startswith(f"{part}.") for key in state):
            pipe.load_lora_into_text_encoder(state, text_encoder=getattr(pipe, part), prefix=part, **common)


def _magnitude_key(key: str) -> str:
    return f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key


def load_embeddings(pipe, embeddings: Mapping[str, torch.Tensor], tokens: list[str]) -> list[str]:
    """{"clip_l": [n, 768], "clip_g": [n, 1280]} as the new `tokens` of both tokenizers and encoders."""
    for key, (encoder, tokenizer) in TEXT_ENCODERS.items():
        pipe.load_textual_inversion(
            embeddings[key], token=tokens, text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, tokenizer)
        )
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

"""The kohya LoRA file that AUTOMATIC1111, Forge and ComfyUI load: `<name>.safetensors`.

For each adapted module `<kohya name>` (see `names.py`) it holds `lora_down.weight` (PEFT's `lora_A`),
`lora_up.weight` (`lora_B`), a scalar `alpha` (the loaders scale by alpha / rank) and, for DoRA, `dora_scale`
(PEFT's `lora_magnitude_vector`, shaped [out, 1, ...] as LyCORIS writes it with `wd_on_output`). Pivotal-tuning
embeddings can ride along as `bundle_emb.<name>.clip_l` / `.clip_g` (A1111's bundled embeddings), and the
safetensors metadata carries kohya's `ss_*` keys, so the UIs list it as an SDXL LoRA.

`kohya_to_peft` reads such a file back into PEFT state dicts and configs for our models; `peft_to_kohya` goes the
other way for PEFT state read from a file (a diffusers LoRA file) rather than from live PEFT layers.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ..checkpoints import OPTIMIZER_FILE, PARAMS_FILE
from ..export import LORA_WEIGHTS_NAME, save_safetensors
from ..tokens import EMBEDDING_KEYS, PivotalTokens
from .names import KOHYA_PREFIXES, canonical_module_path, kohya_module_names, modules_by_kohya_name

BUNDLE_PREFIX = "bundle_emb"
TOKENS_METADATA_KEY = "sdxl_pivotal.tokens"
BASE_MODEL_METADATA_KEY = "sdxl_pivotal.base_model"
# Files of the output folder and of checkpoints that a kohya file named after the run must not replace.
_TAKEN_FILE_NAMES = (LORA_WEIGHTS_NAME, PARAMS_FILE, OPTIMIZER_FILE)


def kohya_file_name(name: str) -> str:
    """`<name>.safetensors`, or `<name>_kohya.safetensors` where that is another output's file name."""
    file_name = f"{name}.safetensors"
    return f"{name}_kohya.safetensors" if file_name in _TAKEN_FILE_NAMES else file_name


def embedding_name(name: str) -> str:
    """The run's name as an A1111 embedding name: no dots (A1111 splits `bundle_emb.<name>.<key>` at them)
    and nothing a prompt cannot hold."""
    return re.sub(r"[^\w\-]", "_", name)


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraLayer]:
    """The model's PEFT LoRA layers of `adapter`, by module path."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_embedding_A:
            raise ValueError(f"{path}: embedding LoRA has no kohya form.")
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            layers[path] = module
    return layers


def kohya_module_state(layer: LoraLayer, adapter: str = "default") -> dict[str, torch.Tensor]:
    """One LoRA layer in kohya's keys (relative to its module name)."""
    if layer.lora_B[adapter].bias is not None:
        raise ValueError("LoRA with a bias (`lora_bias=True`) has no kohya form.")
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach() if layer.use_dora[adapter] else None
    return kohya_tensors(
        layer.lora_A[adapter].weight.detach(),
        layer.lora_B[adapter].weight.detach(),
        # kohya's loaders scale by alpha / rank: this alpha reproduces PEFT's scaling whatever set it
        # (lora_alpha, alpha_pattern, rank_pattern, rsLoRA's alpha / sqrt(rank)).
        layer.scaling[adapter] * layer.r[adapter],
        magnitude,
    )


def kohya_tensors(
    down: torch.Tensor, up: torch.Tensor, alpha: float, magnitude: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One module's kohya tensors (relative to its module name) from PEFT's `lora_A`, `lora_B`, the alpha that
    kohya's loaders divide by the rank, and DoRA's magnitudes, one per output channel in any shape (PEFT's [out]
    for a Linear, [1, out, 1, 1] for a Conv2d) as kohya's `dora_scale` ([out, 1] / [out, 1, 1, 1])."""
    state = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha, dtype=torch.float32)}
    if magnitude is not None:
        state["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (down.dim() - 1))
    return state


def kohya_state_dict(models: Mapping[str, torch.nn.Module], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA of `models` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}) in kohya's keys."""
    state = {}
    for part, model in models.items():
        names = kohya_module_names(part, model)
        for path, layer in lora_layers(model, adapter).items():
            if path not in names:
                raise ValueError(f"{part}.{path} has no kohya name (not in SDXL's SAI layout).")
            state |= {f"{names[path]}.{key}": value for key, value in kohya_module_state(layer, adapter).items()}
    return state


def bundled_embeddings(name: str, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"clip_l": [n, 768], "clip_g": [n, 1280]} as A1111's bundled embedding `name`."""
    return {f"{BUNDLE_PREFIX}.{embedding_name(name)}.{key}": embeddings[key] for key in EMBEDDING_KEYS}


def split_bundled_embeddings(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the LoRA tensors, {embedding name: {"clip_l": ..., "clip_g": ...}}) of a kohya file's tensors."""
    lora, embeddings = {}, {}
    for key, value in state.items():
        if key.startswith(f"{BUNDLE_PREFIX}."):
            name, vector = key.removeprefix(f"{BUNDLE_PREFIX}.").split(".", 1)
            embeddings.setdefault(name, {})[vector] = value
        else:
            lora[key] = value
    return lora, embeddings


def kohya_metadata(
    models: Mapping[str, torch.nn.Module],
    name: str,
    base_model: str,
    tokens: PivotalTokens | None = None,
    bundled: bool = False,
    adapter: str = "default",
) -> dict[str, str]:
    """The file's safetensors metadata (strings only): kohya's `ss_*` keys, the SAI model spec, and ours."""
    config = models["unet"].peft_config[adapter]
    unet_only = set(models) == {"unet"}
    return lora_metadata(config.r, config.lora_alpha, config.use_dora, unet_only, name, base_model, tokens, bundled)


def kohya_state_metadata(
    state: Mapping[str, torch.Tensor],
    name: str,
    base_model: str,
    tokens: PivotalTokens | None = None,
    bundled: bool = False,
) -> dict[str, str]:
    """`kohya_metadata` for a kohya LoRA given by its tensors: the most common rank and alpha of its modules."""
    modules = kohya_modules(state)
    ranks = Counter(tensors["lora_down.weight"].shape[0] for tensors in modules.values())
    alphas = Counter(float(tensors["alpha"]) for tensors in modules.values() if "alpha" in tensors)
    rank = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0] if alphas else rank
    dora = any("dora_scale" in tensors for tensors in modules.values())
    unet_only = all(module.startswith(KOHYA_PREFIXES["unet"]) for module in modules)
    return lora_metadata(rank, alpha, dora, unet_only, name, base_model, tokens, bundled)


def lora_metadata(
    rank: int,
    alpha: float,
    dora: bool,
    unet_only: bool,
    name: str,
    base_model: str,
    tokens: PivotalTokens | None = None,
    bundled: bool = False,
) -> dict[str, str]:
    """The metadata of a kohya LoRA file of (most common) `rank` and `alpha`."""
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": name,
        "ss_sd_model_name": base_model,
        "ss_network_train_unet_only": str(unet_only),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        BASE_MODEL_METADATA_KEY: base_model,
    }
    if dora:
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    if tokens is not None:
        metadata[TOKENS_METADATA_KEY] = json.dumps(tokens.by_abstraction)
        trigger = embedding_name(name) if bundled else tokens.substitute(" ".join(tokens.by_abstraction))
        metadata["ss_training_comment"] = f"Trained with sdxl-pivotal; write {trigger} in the prompt."
    return metadata


def save_kohya_lora(
    folder: Path,
    models: Mapping[str, torch.nn.Module],
    name: str,
    base_model: str,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    tokens: PivotalTokens | None = None,
    bundle: bool = True,
) -> Path:
    """Write `folder/<name>.safetensors` atomically: the LoRA of `models` (the pipeline parts with adapters)
    and, with `bundle`, the pivotal-tuning `embeddings` ({"clip_l", "clip_g"}) as A1111's bundled embedding
    `name`; the new `tokens` are recorded for loaders that prompt with the tokens themselves."""
    state = kohya_state_dict(models)
    bundled = bundle and embeddings is not None
    if bundled:
        state |= bundled_embeddings(name, embeddings)
    metadata = kohya_metadata(models, name, base_model, tokens, bundled)
    tensors = {key: value.contiguous().cpu() for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, folder / kohya_file_name(name), metadata)


@dataclass
class PeftLora:
    """One model's LoRA as PEFT holds it: `set_peft_model_state_dict(model, state)` after
    `model.add_adapter(config)`, or diffusers' loaders with `config.to_dict()` as metadata."""

    state: dict[str, torch.Tensor]
    config: LoraConfig


def kohya_to_peft(state: Mapping[str, torch.Tensor], models: Mapping[str, torch.nn.Module]) -> dict[str, PeftLora]:
    """A kohya LoRA (without bundled embeddings) for `models` ({part: model}), by part."""
    index = modules_by_kohya_name(models)
    by_part: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for module, tensors in kohya_modules(state).items():
        if module not in index:
            raise ValueError(f"No module of {', '.join(models)} has the kohya name {module}.")
        part, path = index[module]
        by_part.setdefault(part, {})[path] = tensors
    return {part: _peft_lora(modules) for part, modules in by_part.items()}


def kohya_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya LoRA's tensors by module: {kohya name: {"lora_down.weight": ..., "lora_up.weight": ..., ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, tensor_name = key.split(".", 1)
        modules.setdefault(module, {})[tensor_name] = value
    return modules


def peft_to_kohya(loras: Mapping[str, PeftLora], models: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The inverse of `kohya_to_peft`: PEFT LoRAs of `models` ({part: model}), by part, in kohya's keys."""
    state = {}
    for part, lora in loras.items():
        names = {
            canonical_module_path(part, path): name for path, name in kohya_module_names(part, models[part]).items()
        }
        for path, tensors in peft_modules(lora.state).items():
            name = names.get(canonical_module_path(part, path))
            if name is None:
                raise ValueError(f"{part}.{path} has no kohya name (not a module of this model's SAI layout).")
            if "lora_B.bias" in tensors:
                raise ValueError(f"{part}.{path}: LoRA with a bias (`lora_bias=True`) has no kohya form.")
            down, up = tensors["lora_A.weight"], tensors["lora_B.weight"]
            alpha = kohya_alpha(lora.config, path, down.shape[0])
            module = kohya_tensors(down, up, alpha, tensors.get("lora_magnitude_vector"))
            state |= {f"{name}.{key}": value for key, value in module.items()}
    return state


def peft_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A PEFT LoRA state by module: {path: {"lora_A.weight": ..., "lora_B.weight": ..., ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        path, tensor_name = key.split(".lora_", 1)
        modules.setdefault(path, {})[f"lora_{tensor_name}"] = value
    return modules


def kohya_alpha(config: LoraConfig, path: str, rank: int) -> float:
    """The kohya alpha (kohya's loaders scale by alpha / rank) of the module `path` of rank `rank` that `config`
    adapts: PEFT's scaling (its alpha, from `alpha_pattern` as PEFT matches it; rsLoRA's alpha / sqrt(rank))
    times the rank."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)
    return alpha * math.sqrt(rank) if config.use_rslora else alpha


def _peft_lora(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> PeftLora:
    """{module path: its kohya tensors} -> PEFT state and config (the most common rank and alpha, the
    others as patterns)."""
    state, ranks, alphas, dora = {}, {}, {}, set()
    for path, tensors in modules.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise ValueError(
                f"{path}: not a LoRA module (its tensors: {', '.join(sorted(tensors))}); LyCORIS' other "
                "algorithms (LoHa, LoKr, ...) have no PEFT LoRA form."
            )
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = down, up
        ranks[path] = down.shape[0]
        alphas[path] = float(tensors["alpha"]) if "alpha" in tensors else float(ranks[path])
        if "dora_scale" in tensors:
            state[f"{path}.lora_magnitude_vector"] = _peft_magnitude(path, tensors["dora_scale"], up.shape[0])
            dora.add(path)
    if dora and dora != set(modules):
        raise ValueError("DoRA on only some modules has no single PEFT config.")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        rank_pattern={path: r for path, r in ranks.items() if r != rank},
        alpha_pattern={path: a for path, a in alphas.items() if a != alpha},
        target_modules=sorted(modules),
        use_dora=bool(dora),
    )
    return PeftLora(state, config)


def _peft_magnitude(path: str, dora_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """kohya's [out, 1] (Linear) or [out, 1, 1, 1] (Conv2d) as PEFT's [out] or [1, out, 1, 1]."""
    if dora_scale.shape[0] != out_features or dora_scale.numel() != out_features:
        raise ValueError(
            f"{path}: dora_scale {tuple(dora_scale.shape)} is not per output channel ([{out_features}, 1, ...]); "
            "PEFT's DoRA has no form for it."
        )
    if dora_scale.dim() <= 2:
        return dora_scale.reshape(out_features)
    return dora_scale.reshape(1, out_features, *[1] * (dora_scale.dim() - 2))

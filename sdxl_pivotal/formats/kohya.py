"""The kohya / LyCORIS file that AUTOMATIC1111, Forge and ComfyUI load: `<name>.safetensors`.

For each adapted module `<kohya name>` (see `names.py`) it holds its family's tensors (`families.py`: LoRA's
`lora_down`/`lora_up`, LoHa's `hada_*`, LoKr's `lokr_*`) and a scalar `alpha` (the loaders scale by alpha / dim).
Pivotal-tuning embeddings can ride along as `bundle_emb.<name>.clip_l` / `.clip_g` (A1111's bundled embeddings),
and the safetensors metadata carries kohya's `ss_*` keys, so the UIs list it as an SDXL LoRA.

DoRA: PEFT computes W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with one magnitude per output channel. ComfyUI and Forge read a
per-output `dora_scale` d as W' = d ⊙ (W + ΔW) / ‖W‖ (the norm of the base weight), so the file holds
d = m ⊙ ‖W‖ / ‖W + ΔW‖, computed from the base weights, which they then reproduce exactly (marked in the metadata,
`DORA_FORM_KEY`). AUTOMATIC1111 normalises over input channels only: no per-input magnitude gives PEFT's result,
so DoRA files are not for A1111 (the README and model card say so).

(IA)³: AUTOMATIC1111 reads LyCORIS' (IA)³ (`weight`, `on_input`) and scales the weight only, where PEFT scales an
output-scaled module's bias too; the two agree on input-scaled modules, modules without a bias and attention keys,
and a module outside these has no kohya form (`check_ia3_module`). ComfyUI and Forge read no (IA)³.

`kohya_to_peft` reads such a file back into PEFT state dicts and configs for our models; `peft_to_kohya` goes the
other way.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

from ..checkpoints import OPTIMIZER_FILE, PARAMS_FILE
from ..errors import InputError
from ..export import LORA_WEIGHTS_NAME, save_safetensors
from ..tokens import EMBEDDING_KEYS, PivotalTokens
from .families import FAMILIES, PEFT_TYPES, PeftLora, Tensors, family_of, live_peft, peft_modules
from .names import KOHYA_PREFIXES, canonical_module_path, kohya_module_names, modules_by_kohya_name

BUNDLE_PREFIX = "bundle_emb"
TOKENS_METADATA_KEY = "sdxl_pivotal.tokens"
BASE_MODEL_METADATA_KEY = "sdxl_pivotal.base_model"
# "comfyui": the file's dora_scale is m ⊙ ‖W‖ / ‖W + ΔW‖, which ComfyUI and Forge apply as PEFT's DoRA.
DORA_FORM_KEY = "sdxl_pivotal.dora_scale"
# LoKr's factorisation options, which PEFT needs to rebuild the same factor shapes.
LOKR_OPTIONS_KEY = "sdxl_pivotal.lokr"
# Module names whose (IA)³ output scaling needs no bias scaling: attention keys (see `check_ia3_module`).
IA3_BIAS_FREE_OUTPUTS = ("to_k", "k_proj")
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


def kohya_state_dict(models: Mapping[str, torch.nn.Module], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapters of `models` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}) in kohya's keys,
    DoRA magnitudes in LyCORIS' convention (`comfyui_dora` converts them for the UIs)."""
    return peft_to_kohya({part: live_peft(model, adapter) for part, model in models.items()}, models)


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


def kohya_state_metadata(
    state: Mapping[str, torch.Tensor],
    name: str,
    base_model: str,
    tokens: PivotalTokens | None = None,
    bundled: bool = False,
) -> dict[str, str]:
    """The file's safetensors metadata (strings only) for a kohya state: kohya's `ss_*` keys (the most common
    rank and alpha, of the linear layers and of the convolutions), the SAI model spec, and ours."""
    modules = kohya_modules(state)
    linear, conv = Counter(), Counter()
    families, dora = set(), False
    for tensors in modules.values():
        family = family_of(tensors)
        _, rank, alpha = family.from_kohya(tensors)
        is_conv = any(value.dim() == 4 and value.shape[-1] > 1 for value in tensors.values())
        if rank is not None:  # (IA)³ has no rank or alpha
            (conv if is_conv else linear)[(rank, alpha)] += 1
        families.add(family.algo)
        dora = dora or "dora_scale" in tensors
    if len(families) != 1:
        raise ValueError(f"A kohya file holds one adapter family, not {sorted(families)}.")
    (algo,) = families
    network_args = {"algo": algo}
    if conv:
        network_args |= dict(zip(("conv_dim", "conv_alpha"), map(str, conv.most_common(1)[0][0]), strict=True))
    if dora:
        network_args |= {"dora_wd": "True", "wd_on_output": "True"}
    kohya_lora = algo == "lora" and not dora
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora" if kohya_lora else "lycoris.kohya",
        "ss_network_args": json.dumps(network_args),
        "ss_output_name": name,
        "ss_sd_model_name": base_model,
        "ss_network_train_unet_only": str(all(m.startswith(KOHYA_PREFIXES["unet"]) for m in modules)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        BASE_MODEL_METADATA_KEY: base_model,
    }
    if linear or conv:
        rank, alpha = (linear or conv).most_common(1)[0][0]
        metadata |= {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
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
    network_args: Mapping[str, str] | None = None,
) -> Path:
    """Write `folder/<name>.safetensors` atomically: the adapters of `models` (the pipeline parts, with their base
    weights) and, with `bundle`, the pivotal-tuning `embeddings` ({"clip_l", "clip_g"}) as A1111's bundled
    embedding `name`; the new `tokens` are recorded for loaders that prompt with the tokens themselves, and
    `network_args` (such as DyLoRA's {"unit": "4"}) in kohya's `ss_network_args`."""
    state = kohya_state_dict(models)
    options = lokr_options(next(iter(models.values())).peft_config["default"])
    metadata = kohya_state_metadata(state, name, base_model, tokens, bundle and embeddings is not None) | options
    if network_args:
        metadata["ss_network_args"] = json.dumps(json.loads(metadata["ss_network_args"]) | dict(network_args))
    if any(key.endswith(".dora_scale") for key in state):
        state = comfyui_dora(state, models)
        metadata[DORA_FORM_KEY] = "comfyui"
    if bundle and embeddings is not None:
        state |= bundled_embeddings(name, embeddings)
    tensors = {key: value.contiguous().cpu() for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, folder / kohya_file_name(name), metadata)


def lokr_options(config: PeftConfig) -> dict[str, str]:
    """Metadata recording LoKr's factor, which the factor shapes alone do not tell PEFT."""
    if not isinstance(config, LoKrConfig):
        return {}
    return {LOKR_OPTIONS_KEY: json.dumps({"decompose_factor": config.decompose_factor})}


def comfyui_dora(
    state: Mapping[str, torch.Tensor], models: Mapping[str, torch.nn.Module], inverse: bool = False
) -> dict[str, torch.Tensor]:
    """DoRA magnitudes m (LyCORIS' `wd_on_output` convention) as the `dora_scale` d = m ⊙ ‖W‖ / ‖W + ΔW‖ that
    ComfyUI and Forge apply as PEFT does (row norms over all but the output axis); `inverse` undoes it. W is the
    module's base weight in `models`, ΔW its LoRA product x alpha / rank."""
    index = modules_by_kohya_name(models)
    converted = dict(state)
    for module, tensors in kohya_modules(state).items():
        if "dora_scale" not in tensors:
            continue
        part, path = index[module]
        weight = _base_weight(models[part], path)
        if weight.is_meta:
            raise InputError(
                "This DoRA file's magnitudes are in ComfyUI's form, which depends on the base model's weights; "
                "convert the run's pytorch_lora_weights.safetensors (PEFT's magnitudes) instead."
            )
        # On the CPU in float64, wherever the model and the file are: the round trip is exact to float32 rounding.
        weight = weight.to("cpu", torch.float64)
        ratio = _row_norms(weight) / _row_norms(weight + lora_product(tensors).reshape(weight.shape))
        dora_scale = tensors["dora_scale"]
        magnitude = dora_scale.to("cpu", torch.float64)
        scaled = magnitude / ratio if inverse else magnitude * ratio
        converted[f"{module}.dora_scale"] = scaled.to(dora_scale.device, dora_scale.dtype)
    return converted


def lora_product(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = up @ down x alpha / rank of one kohya LoRA module, flattened to [out, in x kernel], in float64 on
    the CPU."""
    down, up = (tensors[key].to("cpu", torch.float64) for key in ("lora_down.weight", "lora_up.weight"))
    rank = down.shape[0]
    alpha = float(tensors["alpha"]) if "alpha" in tensors else rank
    return (up.flatten(1) @ down.flatten(1)) * (alpha / rank)


def _base_layer(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model.get_submodule(path)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _base_weight(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The module's base weight as plain numbers (a weight --quantize_unet stored in int8 / fp8: dequantised)."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(_base_layer(model, path)).detach()


def check_ia3_module(model: torch.nn.Module, path: str, on_input: bool) -> None:
    """Raise ValueError where PEFT's (IA)³ and AUTOMATIC1111's / LyCORIS' differ on the module `path` of `model`:
    PEFT scales an output-scaled module's bias with its weight, they scale the weight only. They agree on an
    input-scaled module, on one without a bias, and on attention keys (a key bias adds the same amount to every
    score of a query, which softmax ignores)."""
    if on_input or _base_layer(model, path).bias is None or path.endswith(IA3_BIAS_FREE_OUTPUTS):
        return
    raise ValueError(
        f"{path}: (IA)³ at the output of a layer with a bias has no kohya form (AUTOMATIC1111 and LyCORIS leave "
        "the bias unscaled, PEFT scales it). Scale the next layer's input instead (v_proj's output is out_proj's "
        "input), as this trainer does."
    )


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output channel's weights, shaped [out, 1, ...] to broadcast over the weight."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def kohya_to_peft(
    state: Mapping[str, torch.Tensor],
    models: Mapping[str, torch.nn.Module],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, PeftLora]:
    """A kohya file's adapters (without bundled embeddings) for `models` ({part: model}), by part; `metadata`
    tells the DoRA form and LoKr's factor of our files."""
    metadata = metadata or {}
    if metadata.get(DORA_FORM_KEY) == "comfyui":
        state = comfyui_dora(state, models, inverse=True)
    index = modules_by_kohya_name(models)
    by_part: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for module, tensors in kohya_modules(state).items():
        if module not in index:
            raise ValueError(f"No module of {', '.join(models)} has the kohya name {module}.")
        part, path = index[module]
        if family_of(tensors).name == "ia3":
            check_ia3_module(models[part], path, bool(int(tensors["on_input"])))
        by_part.setdefault(part, {})[path] = tensors
    options = json.loads(metadata.get(LOKR_OPTIONS_KEY, "{}"))
    return {part: _peft_lora(modules, options) for part, modules in by_part.items()}


def kohya_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya file's tensors by module: {kohya name: {"lora_down.weight": ..., "alpha": ..., ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, tensor_name = key.split(".", 1)
        modules.setdefault(module, {})[tensor_name] = value
    return modules


def peft_to_kohya(loras: Mapping[str, PeftLora], models: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The inverse of `kohya_to_peft` (DoRA magnitudes as PEFT's, unconverted): PEFT adapters of `models`
    ({part: model}), by part, in kohya's keys."""
    state = {}
    for part, lora in loras.items():
        family = FAMILIES[PEFT_TYPES[lora.config.peft_type.value]]
        names = {
            canonical_module_path(part, path): (path, name)
            for path, name in kohya_module_names(part, models[part]).items()
        }
        for path, tensors in peft_modules(lora.state).items():
            entry = names.get(canonical_module_path(part, path))
            if entry is None:
                raise ValueError(f"{part}.{path} has no kohya name (not a module of this model's SAI layout).")
            model_path, name = entry
            try:
                module = family.to_kohya(tensors, module_scale(lora.config, path))
                if family.name == "ia3":
                    check_ia3_module(models[part], model_path, bool(int(module["on_input"])))
            except ValueError as error:
                raise ValueError(f"{part}.{path}: {error}") from None
            state |= {f"{name}.{key}": value for key, value in module.items()}
    return state


def module_scale(config: PeftConfig, path: str) -> float:
    """The factor PEFT multiplies the module `path`'s product by: alpha / rank (rsLoRA: alpha / sqrt(rank)), each
    from the config's patterns as PEFT matches them; 1 for (IA)³, which scales by its vector alone."""
    from peft.utils.other import get_pattern_key

    if isinstance(config, IA3Config):
        return 1.0
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
    default_alpha = config.lora_alpha if isinstance(config, LoraConfig) else config.alpha
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), default_alpha)
    if isinstance(config, LoraConfig) and config.use_rslora:
        return alpha / math.sqrt(rank)
    return alpha / rank


def _peft_lora(modules: Mapping[str, Tensors], options: Mapping[str, object]) -> PeftLora:
    """{module path: its kohya tensors} -> PEFT state and config (the most common rank and alpha, the
    others as patterns; (IA)³: the modules scaled at their input as feed-forward ones)."""
    state, ranks, alphas, dora, families = {}, {}, {}, set(), set()
    for path, tensors in modules.items():
        family = family_of(tensors)
        peft, ranks[path], alphas[path] = family.from_kohya(tensors)
        state |= {f"{path}.{key}": value for key, value in peft.items()}
        families.add(family.name)
        if "dora_scale" in tensors:
            dora.add(path)
    if len(families) > 1:
        raise ValueError(f"Modules of several adapter families ({', '.join(sorted(families))}) in one model.")
    if families == {"ia3"}:
        feedforward = sorted(path for path, tensors in modules.items() if int(tensors["on_input"]))
        return PeftLora(state, IA3Config(target_modules=sorted(modules), feedforward_modules=feedforward))
    if dora and dora != set(modules):
        raise ValueError("DoRA on only some modules has no single PEFT config.")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    common = dict(
        r=rank,
        rank_pattern={path: r for path, r in ranks.items() if r != rank},
        alpha_pattern={path: a for path, a in alphas.items() if a != alpha},
        target_modules=sorted(modules),
    )
    (family,) = families
    if family == "lora":
        return PeftLora(state, LoraConfig(lora_alpha=alpha, use_dora=bool(dora), **common))
    tucker = any(key.endswith((".hada_t1", ".lokr_t2")) for key in state)
    if family == "loha":
        return PeftLora(state, LoHaConfig(alpha=alpha, use_effective_conv2d=tucker, **common))
    decompose_both = any(key.endswith(".lokr_w1_a") for key in state)
    factor = int(options.get("decompose_factor", -1))
    config = LoKrConfig(
        alpha=alpha, use_effective_conv2d=tucker, decompose_both=decompose_both, decompose_factor=factor, **common
    )
    return PeftLora(state, config)

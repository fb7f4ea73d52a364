"""One adapted module's tensors in PEFT's form and in kohya's / LyCORIS' form, for each adapter family.

Every family has the same two functions: `to_kohya(peft tensors, scale)` and `from_kohya(kohya tensors)`, where
`scale` is the factor PEFT multiplies the module's product by (alpha / rank, or alpha / sqrt(rank) for rsLoRA).
The UIs' loaders (AUTOMATIC1111, ComfyUI) multiply by `alpha / dim` instead, `dim` being the module's low-rank
dimension as they read it from a tensor's shape; so we write `alpha = scale x dim`.

- LoRA: `lora_A` / `lora_B` are kohya's `lora_down` / `lora_up` (4-D for a convolution), DoRA's magnitude is
  `dora_scale`, [out, 1, ...] as LyCORIS writes it with `wd_on_output` (see `kohya.py` for the UIs' DoRA).
- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) x scale; PEFT uses LyCORIS' names (`hada_w1_a`, ..., `hada_t1/t2` for
  the Tucker form of convolutions), so the tensors are copied; dim is `hada_w1_b`'s first axis.
- LoKr: ΔW = w1 ⊗ w2 x scale, each factor full (`lokr_w1`) or low-rank (`lokr_w1_a @ lokr_w1_b`); names as
  LyCORIS'. With neither factor low-rank the loaders have no dim and use scale 1, so the scale goes into `lokr_w1`.
  A convolution's Tucker form (`lokr_t2`, `--use_effective_conv2d`) is written untucked, as the plain low-rank
  `lokr_w2_a [out, r] @ lokr_w2_b [r, in x kh x kw]` of the same product: ComfyUI and Forge fail on every
  `lokr_t2` module (`torch.kron` of their non-contiguous Tucker rebuild raises, and they skip the module).
- (IA)³: PEFT's `ia3_l` is the scaling vector l itself ([1, in]: it scales the input, a feed-forward module;
  [out, 1]: the output); LyCORIS' `weight` holds l - 1 and `on_input` the side (AUTOMATIC1111 computes
  W + W ⊙ weight, at scale 1: no rank, no alpha). Linear layers only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from peft import PeftConfig

Tensors = dict[str, torch.Tensor]

_PEFT_TENSOR = re.compile(r"^(.*)\.((?:lora_|hada_|lokr_|ia3_)\w+(?:\.weight|\.bias)?)$")


def peft_modules(state: Mapping[str, torch.Tensor]) -> dict[str, Tensors]:
    """A PEFT state by module: {path: {"lora_A.weight": ..., ...}} (or "hada_w1_a", "lokr_w1", "ia3_l", ...)."""
    modules: dict[str, Tensors] = {}
    for key, value in state.items():
        match = _PEFT_TENSOR.match(key)
        if match is None:
            raise ValueError(f"{key} is not a LoRA, LoHa, LoKr or (IA)³ tensor of PEFT.")
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    return modules


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def lora_to_kohya(peft: Tensors, scale: float) -> Tensors:
    if "lora_B.bias" in peft:
        raise ValueError("LoRA with a bias (`lora_bias=True`) has no kohya form.")
    down, up = peft["lora_A.weight"], peft["lora_B.weight"]
    kohya = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _alpha(scale * down.shape[0])}
    if "lora_magnitude_vector" in peft:  # one magnitude per output channel: PEFT's [out] / [1, out, 1, 1]
        kohya["dora_scale"] = peft["lora_magnitude_vector"].reshape(up.shape[0], *[1] * (down.dim() - 1))
    return kohya


def lora_from_kohya(kohya: Tensors) -> tuple[Tensors, int, float]:
    down, up = kohya["lora_down.weight"], kohya["lora_up.weight"]
    rank = down.shape[0]
    peft = {"lora_A.weight": down, "lora_B.weight": up}
    if "dora_scale" in kohya:
        dora_scale = kohya["dora_scale"]
        if dora_scale.shape[0] != up.shape[0] or dora_scale.numel() != up.shape[0]:
            raise ValueError(
                f"dora_scale {tuple(dora_scale.shape)} is not per output channel ([{up.shape[0]}, 1, ...]); "
                "PEFT's DoRA has no form for it."
            )
        shape = (up.shape[0],) if down.dim() == 2 else (1, up.shape[0], *[1] * (down.dim() - 2))
        peft["lora_magnitude_vector"] = dora_scale.reshape(shape)
    return peft, rank, _file_alpha(kohya, rank)


def _file_alpha(kohya: Tensors, dim: int) -> float:
    """The module's alpha; a file without one means alpha = dim (scale 1), as the loaders read it."""
    return float(kohya["alpha"]) if "alpha" in kohya else float(dim)


def loha_to_kohya(peft: Tensors, scale: float) -> Tensors:
    return dict(peft) | {"alpha": _alpha(scale * peft["hada_w1_b"].shape[0])}


def loha_from_kohya(kohya: Tensors) -> tuple[Tensors, int, float]:
    rank = kohya["hada_w1_b"].shape[0]
    return {key: value for key, value in kohya.items() if key != "alpha"}, rank, _file_alpha(kohya, rank)


def _lokr_dim(tensors: Tensors) -> int | None:
    """LoKr's low-rank dimension as the loaders find it (a low-rank factor's `_b`), None if both are full."""
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in tensors:
            return tensors[key].shape[0]
    return None


def untucked_lokr_w2(peft: Tensors) -> Tensors:
    """A Tucker-form LoKr factor (t2 [r, r, kh, kw], w2_a [r, out], w2_b [r, in]) as the plain low-rank pair
    w2_a' [out, r] @ w2_b' [r, in x kh x kw] of the same w2 and rank: the core is folded into w2_b'."""
    core, w2_a, w2_b = peft["lokr_t2"], peft["lokr_w2_a"], peft["lokr_w2_b"]
    folded = torch.einsum("i j k l, j r -> i r k l", core, w2_b)  # [r, in, kh, kw]
    plain = {key: value for key, value in peft.items() if key not in ("lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    return plain | {"lokr_w2_a": w2_a.T.contiguous(), "lokr_w2_b": folded.flatten(1).contiguous()}


def lokr_to_kohya(peft: Tensors, scale: float) -> Tensors:
    if "lokr_t2" in peft:
        peft = untucked_lokr_w2(peft)
    dim = _lokr_dim(peft)
    if dim is not None:
        return dict(peft) | {"alpha": _alpha(scale * dim)}
    return dict(peft) | {"lokr_w1": peft["lokr_w1"] * scale}  # the loaders' scale is 1 here


def lokr_from_kohya(kohya: Tensors) -> tuple[Tensors, int, float]:
    peft = {key: value for key, value in kohya.items() if key != "alpha"}
    dim = _lokr_dim(kohya)
    if dim is not None:
        return peft, dim, _file_alpha(kohya, dim)
    # Both factors full: any rank at least half of every factor side makes PEFT build them full; scale 1.
    rank = max(*kohya["lokr_w1"].shape[:2], *kohya["lokr_w2"].shape[:2])
    return peft, rank, float(rank)


def ia3_to_kohya(peft: Tensors, scale: float) -> Tensors:
    """`scale` is 1: PEFT's (IA)³ has none."""
    vector = peft["ia3_l"]
    if vector.dim() != 2:
        raise ValueError("(IA)³ of a convolution has no kohya form here (LyCORIS' differs in shape); Linear only.")
    on_input = vector.shape[0] == 1  # [1, in]: a feed-forward module, scaled at its input
    return {"weight": vector.flatten() - 1, "on_input": torch.tensor(int(on_input))}


def ia3_from_kohya(kohya: Tensors) -> tuple[Tensors, None, None]:
    weight = kohya["weight"]
    if weight.dim() != 1 or "on_input" not in kohya:
        raise ValueError(
            f"(IA)³ tensors weight {tuple(weight.shape)} / on_input are not of a Linear layer's (IA)³ (LyCORIS' "
            "`weight` [features] and `on_input`); convolutions are not read."
        )
    shape = (1, -1) if int(kohya["on_input"]) else (-1, 1)
    return {"ia3_l": (weight + 1).reshape(shape)}, None, None


@dataclass(frozen=True)
class Family:
    """An adapter family: its `--adapter` name, LyCORIS' `algo`, the starts of the tensor names that mark it in
    either form, and its two conversions (`from_kohya` gives the tensors, rank and alpha; (IA)³ has neither)."""

    name: str
    algo: str
    marks: tuple[str, ...]
    to_kohya: Callable[[Tensors, float], Tensors]
    from_kohya: Callable[[Tensors], tuple[Tensors, int | None, float | None]]


FAMILIES = {
    "lora": Family("lora", "lora", ("lora_",), lora_to_kohya, lora_from_kohya),
    "loha": Family("loha", "loha", ("hada_",), loha_to_kohya, loha_from_kohya),
    "lokr": Family("lokr", "lokr", ("lokr_",), lokr_to_kohya, lokr_from_kohya),
    "ia3": Family("ia3", "ia3", ("ia3_", "on_input"), ia3_to_kohya, ia3_from_kohya),
}
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr", "IA3": "ia3"}


def family_of(tensors: Mapping[str, torch.Tensor]) -> Family:
    """The family of one module's tensors, in either form."""
    for family in FAMILIES.values():
        if any(key.startswith(family.marks) for key in tensors):
            return family
    raise ValueError(f"tensors {', '.join(sorted(tensors))} are not of a LoRA, LoHa, LoKr or (IA)³ module.")


@dataclass
class PeftLora:
    """One model's adapter as PEFT holds it: `set_peft_model_state_dict(model, state)` after
    `model.add_adapter(config)`, or diffusers' loaders with `config.to_dict()` as metadata (LoRA)."""

    state: dict[str, torch.Tensor]
    config: PeftConfig


def live_peft(model: torch.nn.Module, adapter: str = "default") -> PeftLora:
    """The model's adapter `adapter` as PEFT state (adapter name removed) and config."""
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" would look up the base model's config, over the network for Hub ids.
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    return PeftLora({key: value.detach() for key, value in state.items()}, model.peft_config[adapter])

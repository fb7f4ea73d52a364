"""Our own reconstruction of a module's weight change from kohya / LyCORIS-format tensors, written from the
published formulas (LyCORIS; the loaders of AUTOMATIC1111 and ComfyUI), independent of PEFT and of the exporter.

Every function takes one module's tensors (names relative to the module, as in the file) and the shape of the
base weight, and returns ΔW, the change the loaders add to the base weight at strength 1; (IA)³'s change depends on
the base weight itself, so `ia3_weight` takes it and returns the weight the loader computes.
"""

from __future__ import annotations

import torch


def _scale(tensors: dict[str, torch.Tensor], dim: int | None) -> float:
    """alpha / dim, the loaders' scale; 1 without a dim or an alpha."""
    if dim is None or "alpha" not in tensors:
        return 1.0
    return float(tensors["alpha"]) / dim


def lora_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoRA / LoCon: ΔW = up @ down x alpha / rank (convolutions flattened to [out, in x kh x kw])."""
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    return (up.flatten(1) @ down.flatten(1) * _scale(tensors, down.shape[0])).reshape(shape)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The CP/Tucker rebuild of a convolution factor: t [r, r, kh, kw] with wa [r, out], wb [r, in]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def loha_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) x alpha / dim, dim = w1_b's rows (Tucker form with t1, t2)."""
    t = {key: value.double() for key, value in tensors.items()}
    if "hada_t1" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2 * _scale(tensors, t["hada_w1_b"].shape[0])).reshape(shape)


def lokr_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoKr: ΔW = w1 ⊗ w2 x alpha / dim, each factor full or low-rank (a @ b), dim = a low-rank factor's rows
    (none: scale 1); a 4-D w2 takes w1 as [a, c, 1, 1]."""
    t = {key: value.double() for key, value in tensors.items()}
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2, dim = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]), t["lokr_w2_b"].shape[0]
    else:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1.contiguous(), w2.contiguous()) * _scale(tensors, dim)).reshape(shape)


def comfyui_lokr_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LoKr as ComfyUI (comfy/weight_adapter/lokr.py) and Forge compute it, step for step: the Tucker rebuild
    `einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a)` goes into `torch.kron` as it comes (not made
    contiguous), which raises for a Tucker factor; they then log the error and leave the module unchanged."""
    t = {key: value.double() for key, value in tensors.items()}
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2).reshape(shape) * _scale(tensors, dim)


def module_delta(tensors: dict[str, torch.Tensor], shape: torch.Size, comfyui: bool = False) -> torch.Tensor:
    """ΔW of one module, as A1111 computes it (or, with `comfyui`, as ComfyUI and Forge do)."""
    if "lora_down.weight" in tensors:
        return lora_delta(tensors, shape)
    if "hada_w1_a" in tensors:
        return loha_delta(tensors, shape)
    return comfyui_lokr_delta(tensors, shape) if comfyui else lokr_delta(tensors, shape)


def comfyui_weight(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI / Forge compute for a module at strength 1: W + ΔW, or with a per-output `dora_scale` d,
    (W + ΔW) ⊙ d / ‖W‖ (norm of each output channel of the base weight)."""
    weight = weight.double()
    merged = weight + module_delta(tensors, weight.shape, comfyui=True)
    if "dora_scale" not in tensors:
        return merged
    norms = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return merged * tensors["dora_scale"].double() / norms


def ia3_weight(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """(IA)³ as AUTOMATIC1111 applies LyCORIS' tensors (network_ia3.py): W + W ⊙ w, with the vector w over the input
    columns where `on_input` is 1, else over the output rows; the layer's bias is left as it is."""
    w, weight = tensors["weight"].double(), weight.double()
    return weight + weight * (w if int(tensors["on_input"]) else w.reshape(-1, 1))

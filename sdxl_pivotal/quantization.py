"""--quantize_unet: the frozen UNet's Linear weights stored in int8 or fp8 (torchao weight-only quantisation), the
adapters on top in float32, as QLoRA does with 4-bit weights.

torchao's `quantize_` turns each frozen Linear weight into a tensor subclass holding 1-byte values and one scale per
output row (`Int8WeightOnlyConfig`, `Float8WeightOnlyConfig`: e4m3); the matmul runs in the activations' precision.
The LoRA layers PEFT attached keep their float32 weights and their names, so the saved files, checkpoints and
validation are those of an unquantised run. Linear layers hold 87% of SDXL's UNet (2.23 of 2.57 B numbers), so the
UNet's weights go from 5.1 GB (bf16) to 2.9 GB; convolutions, norms and the text encoders stay as they are.

Why the layers are swapped for `QuantizedLinear`: torchao's weight-only linear multiplies by a full-precision copy of
the weight, and autograd keeps that copy for the backward pass (the gradient of the input needs it), one per layer
and step, which gives back what quantising saved. `QuantizedLinear` keeps only the quantised weight and dequantises
it again in the backward pass, one layer at a time.
"""

from __future__ import annotations

import torch


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen; backward keeps W in its quantised form, not a dequantised copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the module's own parameter: a reference, no copy
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # d(x W^T)/dx = grad W: the weight in the gradient's precision, for this layer only.
        grad_input = grad_output @ ctx.weight.dequantize(grad_output.dtype)
        return grad_input, None, None


class QuantizedLinear(torch.nn.Linear):
    """A frozen Linear whose weight torchao stores quantised (same parameters and names as the layer it replaces)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenQuantizedLinear.apply(x, self.weight, self.bias)


def quantization_config(kind: str):
    """torchao's weight-only config for `--quantize_unet kind` (per output row, symmetric)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[kind]()


def is_frozen_linear(module: torch.nn.Module, path: str = "") -> bool:
    """A Linear layer whose weight is not trained: the UNet's own layers, including those an adapter wraps (their
    `base_layer`); not the adapters' own Linear layers (LoRA's A and B), which are trained."""
    return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad


def quantize_frozen_linears(model: torch.nn.Module, kind: str) -> int:
    """Store every frozen Linear weight of `model` as `kind` ("int8" or "fp8"), in place; return how many layers.
    Run after the adapters are attached and the weights have their training dtype and device."""
    from torchao.quantization import quantize_

    paths = [path for path, module in model.named_modules() if is_frozen_linear(module)]
    quantize_(model, quantization_config(kind), filter_fn=is_frozen_linear)
    for path in paths:
        old = model.get_submodule(path)
        new = QuantizedLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        model.set_submodule(path, new)
    return len(paths)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of `model` hold in memory (a quantised weight: its values and scales)."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        total += sum(inner.numel() * inner.element_size() for inner in inner_tensors(tensor))
    return total


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or a tensor subclass's components (torchao's values,
    scales and zero points)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in inner_tensors(getattr(tensor, name))]

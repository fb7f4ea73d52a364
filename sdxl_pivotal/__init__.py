"""sdxl-pivotal: SDXL DreamBooth LoRA training with pivotal tuning, native to the Hugging Face stack."""

import logging


class _OptionalKernelNoise(logging.Filter):
    """Drops what torchao (optional, for --quantize_unet) logs each time diffusers imports it where its CUDA
    kernels cannot load: torchao's "Failed to load .../_C_*.so", diffusers' note about torchao-serialized
    checkpoints (we load none) and torch's deprecation of torchao's Enum registration. Nothing else is filtered,
    so every command's errors stay one readable line."""

    NOISE = (
        "Failed to load ",
        "Unable to import `torchao` Tensor objects",
        "is an Enum subclass and is now natively supported by torch.compile",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_OptionalKernelNoise())

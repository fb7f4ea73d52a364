"""Before training: time, cost and memory for the chosen settings and hardware.

Measured figures: the embedded tiny SDXL on a 2-core CPU (benchmarks/README.md: 0.136 s/step at 128 px,
batch 4, one thread; the `small` preset 1.614 s/step at 256 px). No GPU figure has been measured yet: for SDXL
on a GPU the time is not estimated, and the memory is the weights and optimizer state (exact, from parameter
counts) plus an activation allowance that is an assumption, labelled as such, until measured.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# Parameters of SDXL base: UNet, CLIP ViT-L, OpenCLIP ViT-bigG, VAE.
SDXL_FROZEN_PARAMETERS = 2_567_463_684 + 123_060_480 + 694_659_840 + 83_653_863
# Trainable parameters of a rank-r attention LoRA on SDXL's UNet: 5.81 M at rank 4 (README, adapter_sizes.py).
SDXL_LORA_PARAMETERS_PER_RANK = 5.81e6 / 4
# Assumed, not measured: activation memory per image at 1024 px with mixed precision, without / with gradient
# checkpointing.
ASSUMED_ACTIVATION_GIB = (8.0, 2.0)
# Measured on the 2-core CPU VM (benchmarks/README.md): s/step of the tiny SDXL at 128 px, batch 4, one thread.
TINY_CPU_S_PER_STEP = 0.136


@dataclass(frozen=True)
class Hardware:
    label: str
    memory_gib: float  # GPU memory; CPU RAM for the CPU
    usd_per_hour: float
    gpu: bool = True


# Hugging Face Spaces hardware and its listed hourly price (check the current price list before relying on it).
HARDWARE = {
    "cpu-basic": Hardware("CPU basic (2 vCPU, 16 GB, free)", 16, 0.0, gpu=False),
    "t4-small": Hardware("Nvidia T4 small (16 GB)", 16, 0.40),
    "l4x1": Hardware("Nvidia 1x L4 (24 GB)", 24, 0.80),
    "a10g-small": Hardware("Nvidia A10G small (24 GB)", 24, 1.00),
    "a10g-large": Hardware("Nvidia A10G large (24 GB)", 24, 1.50),
    "l40sx1": Hardware("Nvidia 1x L40S (48 GB)", 48, 1.80),
    "a100-large": Hardware("Nvidia A100 large (80 GB)", 80, 2.50),
}


@dataclass
class Estimate:
    seconds: float | None
    memory_gib: float
    memory_floor_gib: float  # weights + optimizer state alone
    notes: list[str]

    def markdown(self, hardware: Hardware) -> str:
        lines = []
        if self.seconds is None:
            lines.append("**Time:** no measured figure for this model on this hardware yet.")
        else:
            cost = self.seconds / 3600 * hardware.usd_per_hour
            lines.append(f"**Time:** about {self.seconds / 60:.1f} min (measured s/step, scaled) · cost ${cost:.2f}")
        lines.append(f"**Memory:** about {self.memory_gib:.1f} GiB of {hardware.memory_gib:g} GiB")
        if self.memory_floor_gib > hardware.memory_gib:
            lines.append("⚠️ **Will not fit:** the weights and optimizer state alone exceed the memory.")
        elif self.memory_gib > hardware.memory_gib:
            lines.append("⚠️ **May not fit:** lower the batch size or resolution, or turn on gradient checkpointing.")
        return "\n\n".join(lines + [f"<small>{note}</small>" for note in self.notes])


def estimate(settings: dict, tiny: bool, hardware: Hardware) -> Estimate:
    """Time and memory for `settings` (trainer `dest` -> value) on `hardware`."""
    batch = int(settings.get("train_batch_size") or 4) * int(settings.get("gradient_accumulation_steps") or 1)
    resolution = int(settings.get("resolution") or 1024)
    steps = int(settings.get("max_train_steps") or 0)
    if tiny:
        seconds = None
        notes = ["Tiny model: memory is small; time from its measured CPU speed (benchmarks/README.md)."]
        if not hardware.gpu:
            seconds = steps * TINY_CPU_S_PER_STEP * batch / 4 * (resolution / 128) ** 2
        return Estimate(seconds, 1.0, 0.5, notes)
    bytes_per_weight = 2 if settings.get("mixed_precision") in ("fp16", "bf16") else 4
    trainable = SDXL_LORA_PARAMETERS_PER_RANK * int(settings.get("rank") or 4)
    floor = (SDXL_FROZEN_PARAMETERS * bytes_per_weight + trainable * 16) / GIB  # fp32 weight, grad, 2 Adam moments
    per_image = ASSUMED_ACTIVATION_GIB[1 if settings.get("gradient_checkpointing") else 0]
    activations = per_image * int(settings.get("train_batch_size") or 4) * (resolution / 1024) ** 2
    notes = [
        f"Weights and optimizer state: {floor:.1f} GiB (from SDXL's parameter counts). Activations: an assumed "
        f"{per_image:g} GiB per image at 1024 px, not yet measured.",
        "No GPU time has been measured yet, so no time or cost is given for SDXL.",
    ]
    return Estimate(None, floor + activations, floor, notes)

"""Before training: time, cost and memory for the chosen settings and hardware.

Memory is the memory planner's (`sdxl_pivotal.plan`): the trainer's own code run for two steps on fake tensors of
the chosen model's shapes, every live tensor counted; on a GPU plus the CUDA context and allocator slack, on the CPU
plus what the process holds besides tensors (the libraries). At SDXL size it takes about a minute of one CPU core,
so it runs in a worker process and each command's result is kept. Time: measured figures of the embedded tiny SDXL
on a 2-core CPU (benchmarks/README.md: 0.136 s/step at 128 px, batch 4, one thread); no GPU time has been measured
yet, so none is given for SDXL on a GPU.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from ..plan import GIB, MemoryEstimate

# Measured on the 2-core CPU VM (benchmarks/README.md): s/step of the tiny SDXL at 128 px, batch 4, one thread.
TINY_CPU_S_PER_STEP = 0.136
# What a CPU training process holds besides tensors (libraries, interpreter): peak RSS less the peak of live tensors
# of the small preset's pivotal + prior run at 256 px (benchmarks/README.md: 0.88 GiB RSS, 0.30 GiB tensors).
CPU_PROCESS_GIB = 0.6


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
    memory_gib: float | None  # None: no planner figure (still computing, or it failed)
    memory_floor_gib: float | None  # weights + gradients + optimizer state alone
    notes: list[str]

    def markdown(self, hardware: Hardware) -> str:
        lines = []
        if self.seconds is None:
            lines.append("**Time:** no measured figure for this model on this hardware yet.")
        else:
            cost = self.seconds / 3600 * hardware.usd_per_hour
            lines.append(f"**Time:** about {self.seconds / 60:.1f} min (measured s/step, scaled) · cost ${cost:.2f}")
        if self.memory_gib is None:
            lines.append("**Memory:** estimating…")
        else:
            lines.append(f"**Memory:** about {self.memory_gib:.1f} GiB of {hardware.memory_gib:g} GiB")
        if self.memory_floor_gib is not None and self.memory_floor_gib > hardware.memory_gib:
            lines.append("⚠️ **Will not fit:** the weights and optimizer state alone exceed the memory.")
        elif self.memory_gib is not None and self.memory_gib > hardware.memory_gib:
            lines.append(
                "⚠️ **May not fit:** turn on gradient checkpointing, 8-bit Adam or --quantize_unet int8, or lower "
                "the batch size or resolution (`python -m sdxl_pivotal.plan --gpu_memory N <flags>` proposes one)."
            )
        return "\n\n".join(lines + [f"<small>{note}</small>" for note in self.notes])


def estimate(settings: dict, tiny: bool, hardware: Hardware, memory: MemoryEstimate | str | None) -> Estimate:
    """Time and memory for `settings` (trainer `dest` -> value) on `hardware`; `memory` is the planner's estimate of
    the same command (`planned_memory`), the reason it has none (str), or None while it is being computed."""
    batch = int(settings.get("train_batch_size") or 4) * int(settings.get("gradient_accumulation_steps") or 1)
    resolution = int(settings.get("resolution") or 1024)
    steps = int(settings.get("max_train_steps") or 0)
    seconds = None
    notes = []
    if tiny and not hardware.gpu:
        seconds = steps * TINY_CPU_S_PER_STEP * batch / 4 * (resolution / 128) ** 2
        notes.append("Time from the tiny model's measured CPU speed (benchmarks/README.md).")
    elif not tiny:
        notes.append("No GPU time has been measured yet, so no time or cost is given for SDXL.")
    if not isinstance(memory, MemoryEstimate):
        if isinstance(memory, str):
            notes.append(f"No memory estimate: {memory}")
        return Estimate(seconds, None, None, notes)
    floor = memory.weights + memory.trainable_numbers * (4 + memory.optimizer_state_bytes)
    if hardware.gpu:
        needed = memory.needed
        notes.append(f"Memory planner: {memory.summary()}.")
    else:
        needed = memory.peak / GIB + CPU_PROCESS_GIB
        notes.append(
            f"Memory planner: tensors peak at {memory.peak / GIB:.2f} GiB, plus about {CPU_PROCESS_GIB} GiB of "
            "libraries."
        )
    notes += [f"Note: {note}." for note in memory.notes]
    return Estimate(seconds, needed, floor / GIB, notes)


_PLANS: dict[tuple[str, ...], MemoryEstimate | str] = {}
_POOL: list[ProcessPoolExecutor] = []
_LOCK = threading.Lock()


def cached_memory(argv: list[str]) -> MemoryEstimate | str | None:
    """The planner's estimate of the trainer command `argv` if it was computed before, else None."""
    return _PLANS.get(tuple(argv))


def planned_memory(argv: list[str]) -> MemoryEstimate | str:
    """The planner's estimate of the trainer command `argv` (computed once, in a worker process), or why there is
    none (a setting the planner cannot read, a model whose configs are not at hand)."""
    key = tuple(argv)
    if key not in _PLANS:
        with _LOCK:
            if not _POOL:
                import multiprocessing

                context = multiprocessing.get_context("spawn")
                _POOL.append(ProcessPoolExecutor(1, context, _exit_with_parent, (os.getpid(),)))
            future: Future = _POOL[0].submit(_plan_in_worker, key)
        _PLANS[key] = future.result()
    return _PLANS[key]


def _exit_with_parent(parent: int) -> None:
    """Watch the app from the worker: an app stopped by a signal runs no clean-up, and an idle worker would
    otherwise outlive it (holding its libraries' memory)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _plan_in_worker(argv: tuple[str, ...]) -> MemoryEstimate | str:
    from ..plan import estimate as plan_estimate
    from ..plan import parse_plan_args

    try:
        return plan_estimate(parse_plan_args(list(argv))[1])
    except (Exception, SystemExit) as error:  # argparse exits on a bad value: the estimate is not the place to fail
        return f"the planner could not size this command ({type(error).__name__}: {error})"

"""How the run was launched: one process, or several under DDP (accelerate's multi-GPU or multi-CPU mode, or
torchrun). Other setups are refused before anything loads, with the command that works."""

from __future__ import annotations

import os
from collections.abc import Mapping

from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from .errors import InputError

# accelerate's environment variables for setups whose checkpoints and model wrapping are not ours: our
# checkpoints hold the trainable parameters and optimizer by name, and the exports read unwrapped modules.
UNSUPPORTED_LAUNCHES = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
CPU_COMMAND = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"


def check_launch_environment() -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM (set by `accelerate config`/`accelerate launch`); before the
    Accelerator is made, which would already need their packages."""
    for variable, name in UNSUPPORTED_LAUNCHES.items():
        if parse_flag_from_env(variable):
            raise InputError(
                f"{name} is not supported ({variable} is set by your accelerate config): a LoRA is small, and "
                "this trainer's checkpoints and exports are tested with DDP only. Run `accelerate config` and "
                "choose multi-GPU without FSDP/DeepSpeed, or launch with `accelerate launch --multi_gpu`."
            )


def check_process_group(accelerator: Accelerator, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse several processes that each think they are alone (e.g. `accelerate launch --multi_gpu` on a
    machine without GPUs): they would train the same run side by side into the same folders."""
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise InputError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but they did not form a process group: "
            "each would train alone into the same output folder. Without GPUs, make them a CPU group: "
            f"`{CPU_COMMAND} ...` (or set ACCELERATE_USE_CPU=1 for torchrun); else launch one process."
        )

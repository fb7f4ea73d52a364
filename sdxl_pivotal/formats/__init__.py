"""LoRA file formats beyond diffusers' own: the kohya file for AUTOMATIC1111 / ComfyUI (`kohya.py`), the name
table it shares with its reader (`names.py`), diffusers' LoRA file read as PEFT state (`diffusers_lora.py`),
SDXL's module tree without weights (`architecture.py`), and loading any file we write into diffusers (`load.py`)."""

from .architecture import empty_sdxl_models
from .diffusers_lora import diffusers_to_peft, save_diffusers_lora, save_diffusers_peft
from .families import PeftLora
from .kohya import kohya_file_name, kohya_state_dict, kohya_to_peft, peft_to_kohya, save_kohya_lora
from .load import load_for_diffusers

__all__ = [
    "PeftLora",
    "diffusers_to_peft",
    "empty_sdxl_models",
    "kohya_file_name",
    "kohya_state_dict",
    "kohya_to_peft",
    "load_for_diffusers",
    "peft_to_kohya",
    "save_diffusers_lora",
    "save_diffusers_peft",
    "save_kohya_lora",
]

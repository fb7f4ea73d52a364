"""LoRA file formats beyond diffusers' own: the kohya file for AUTOMATIC1111 / ComfyUI (`kohya.py`), the name
table it shares with its reader (`names.py`), and loading any file we write into diffusers (`load.py`)."""

from .kohya import PeftLora, kohya_file_name, kohya_state_dict, kohya_to_peft, save_kohya_lora
from .load import load_for_diffusers

__all__ = [
    "PeftLora",
    "kohya_file_name",
    "kohya_state_dict",
    "kohya_to_peft",
    "load_for_diffusers",
    "save_kohya_lora",
]

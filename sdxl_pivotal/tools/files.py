"""What the subcommands share: checked paths, and LoRA files read into, and written from, kohya's form.

Inside the tools every LoRA is a kohya state ({"<kohya module>.lora_down.weight": ..., ".lora_up.weight", ".alpha",
".dora_scale"}), whatever its file: a diffusers file is converted when read (`peft_to_kohya`) and when written
(`kohya_to_peft`) through the module tree it adapts, with the one name table of `formats/names.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..export import save_safetensors
from ..formats.architecture import SDXL_BASE_MODEL
from ..formats.diffusers_lora import diffusers_to_peft, is_diffusers_lora, save_diffusers_peft
from ..formats.kohya import (
    DORA_FORM_KEY,
    TOKENS_METADATA_KEY,
    bundled_embeddings,
    kohya_state_metadata,
    kohya_to_peft,
    lokr_options,
    peft_to_kohya,
    split_bundled_embeddings,
)
from ..formats.load import lora_file_format, read_safetensors
from ..tokens import EMBEDDING_KEYS, PivotalTokens

FORMATS = ("kohya", "diffusers")
# kohya's metadata of a file's ranks and alphas, recomputed when the tools change them.
RANK_METADATA_KEYS = ("ss_network_dim", "ss_network_alpha", "ss_network_args")


@dataclass
class LoraFile:
    """A LoRA in kohya's form, with what its file carried besides: bundled embeddings and metadata."""

    format: str
    lora: dict[str, torch.Tensor]
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> PivotalTokens | None:
        """The pivotal-tuning tokens the file records, if any."""
        if TOKENS_METADATA_KEY not in self.metadata:
            return None
        return PivotalTokens(json.loads(self.metadata[TOKENS_METADATA_KEY]))


def existing_file(path: str | Path) -> Path:
    """`path`, which must be a file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    return path


def existing_dir(path: str | Path) -> Path:
    """`path`, which must be a folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such folder.")
    return path


def new_output(path: str | Path, overwrite: bool, *inputs: Path) -> Path:
    """`path` as an output: never one of the `inputs`, and not an existing file or folder unless `overwrite`."""
    path = Path(path)
    if any(path.resolve() == Path(source).resolve() for source in inputs):
        raise InputError(f"{path} is an input of this command; write the result elsewhere.")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it.")
    return path


@contextlib.contextmanager
def bad_input(path: Path) -> Iterator[None]:
    """Report the format layer's ValueErrors about the file `path` as bad input, naming the file."""
    try:
        yield
    except InputError:
        raise
    except ValueError as error:
        raise InputError(f"{path}: {error}") from error


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    from safetensors import SafetensorError

    path = existing_file(path)
    try:
        return read_safetensors(path)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: not a readable safetensors file ({error}).") from error


def read_lora(path: str | Path, models: Mapping[str, torch.nn.Module]) -> LoraFile:
    """A kohya or diffusers LoRA file of `models` ({part: model}) in kohya's form."""
    path = Path(path)
    state, metadata = read_tensors(path)
    file_format = lora_file_format(state)
    lora, embeddings = split_bundled_embeddings(state)
    if file_format == "embeddings" or not lora:
        raise InputError(f"{path} holds no LoRA, only embeddings.")
    if file_format == "diffusers":
        if not is_diffusers_lora(lora):
            raise InputError(f"{path} is neither a kohya nor a diffusers LoRA file (keys such as {next(iter(lora))}).")
        with bad_input(path):
            loras = diffusers_to_peft(lora, metadata)
            lora = peft_to_kohya(loras, models)
        metadata = metadata | lokr_options(next(iter(loras.values())).config)
    return LoraFile(file_format, lora, embeddings, metadata)


def with_new_ranks(lora: LoraFile, state: dict[str, torch.Tensor], name: str, base: str | Path | None) -> LoraFile:
    """`lora` holding `state`, the same modules at other ranks, instead; for a kohya file, with kohya's rank and
    alpha metadata recomputed for it (`name` and `base` as the file's name and base model there)."""
    if lora.format != "kohya":
        return dataclasses.replace(lora, lora=state)
    fresh = kohya_state_metadata(state, name, str(base or SDXL_BASE_MODEL))
    metadata = lora.metadata | {key: fresh[key] for key in RANK_METADATA_KEYS}
    return dataclasses.replace(lora, lora=state, metadata=metadata)


def write_lora(path: Path, lora: LoraFile, models: Mapping[str, torch.nn.Module]) -> list[Path]:
    """Write `lora` in its `format` (atomically): a kohya file with its bundled embeddings and metadata, or a
    diffusers file and, for bundled embeddings, `<stem>_emb.safetensors` beside it. Returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous().cpu() for key, value in lora.lora.items()}
    if lora.format == "kohya":
        if any(key.endswith(".dora_scale") for key in tensors) and DORA_FORM_KEY not in lora.metadata:
            raise InputError(
                f"{path}: the tools do not write DoRA kohya files: the form ComfyUI applies as PEFT does depends on "
                "the base weights. Use the trainer's kohya file."
            )
        return [save_safetensors(tensors | bundled(lora.embeddings), path, lora.metadata)]
    if len(lora.embeddings) > 1:
        raise InputError(f"{path}: a diffusers file has no room for {len(lora.embeddings)} bundled embeddings.")
    with bad_input(path):
        written = [save_diffusers_peft(path, kohya_to_peft(tensors, models, lora.metadata))]
    for embeddings in lora.embeddings.values():
        tokens = {TOKENS_METADATA_KEY: lora.metadata[TOKENS_METADATA_KEY]} if lora.tokens else None
        written.append(save_safetensors(dict(embeddings), embeddings_path(path), tokens))
    return written


def embeddings_path(path: Path) -> Path:
    """Where the embeddings of the diffusers LoRA file `path` go: `<stem>_emb.safetensors` beside it."""
    return path.with_name(f"{path.stem}_emb.safetensors")


def bundled(embeddings: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Embeddings by name as a kohya file bundles them."""
    return {
        key: value for name, vectors in embeddings.items() for key, value in bundled_embeddings(name, vectors).items()
    }


def read_embeddings(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An `_emb` file ({"clip_l", "clip_g"}) and its metadata."""
    state, metadata = read_tensors(path)
    if set(state) != set(EMBEDDING_KEYS):
        raise InputError(f"{path} is not an embeddings file (keys {', '.join(EMBEDDING_KEYS)}).")
    return state, metadata

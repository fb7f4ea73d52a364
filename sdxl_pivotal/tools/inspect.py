"""Print what a LoRA file holds: format, modules per part, ranks, alphas, DoRA, embeddings, tokens, metadata.

Reads kohya / LyCORIS files, diffusers files and embeddings files, without loading a model. Alphas are those kohya's
loaders divide by the rank (for a diffusers file: resolved from its LoRA config). Long metadata values are shortened;
the values of secret-looking keys are hidden.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.diffusers_lora import diffusers_lora_metadata, diffusers_to_peft, is_diffusers_lora
from ..formats.families import FAMILIES, PEFT_TYPES, family_of, peft_modules
from ..formats.kohya import TOKENS_METADATA_KEY, kohya_modules, module_scale, split_bundled_embeddings
from ..formats.load import lora_file_format
from ..formats.names import KOHYA_PREFIXES
from ..tokens import EMBEDDING_KEYS
from .files import bad_input, read_tensors

MAX_VALUE_LENGTH = 100
SECRET_KEY = re.compile(r"secret|passw|api[_-]?key|auth|credential|(^|[._-])(hf_|hub_|access_)?token$", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
PARTS_ORDER = (*KOHYA_PREFIXES, "other")
# LyCORIS algorithms other than LoRA / LoCon, by the start of their tensor names.
LYCORIS_KINDS = {
    "lora_": "LoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "on_input": "(IA)³",
    "oft_": "OFT",
    "diff": "full difference",
}


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module: its pipeline part, its kind (LoRA or a LyCORIS algorithm), rank, alpha, DoRA (rank and
    alpha None for kinds without them: (IA)³, and those PEFT does not train)."""

    part: str
    kind: str
    rank: int | None = None
    alpha: float | None = None
    dora: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .safetensors file: LoRA (kohya, LyCORIS, diffusers) or embeddings")


def run(args: argparse.Namespace) -> None:
    print("\n".join(describe_file(args.file)))


def describe_file(path: str | Path) -> list[str]:
    """The report's lines."""
    state, metadata = read_tensors(path)
    file_format = lora_file_format(state)
    lines = [f"file: {path}"]
    if file_format == "embeddings":
        lines += ["format: embeddings (pivotal tuning, `<name>_emb.safetensors`), no LoRA"]
        lines += [f"embeddings: {shapes(state)}", tokens_line(metadata)]
    else:
        lora, bundles = split_bundled_embeddings(state)
        with bad_input(Path(path)):
            modules = kohya_module_infos(lora) if file_format == "kohya" else diffusers_module_infos(lora, metadata)
        lines += [f"format: {format_label(file_format, modules, metadata)}", *module_lines(modules)]
        lines += [f"embeddings: {name} (bundled): {shapes(vectors)}" for name, vectors in bundles.items()]
        if bundles or TOKENS_METADATA_KEY in metadata:
            lines.append(tokens_line(metadata))
    return lines + metadata_lines(metadata)


def kohya_module_infos(lora: Mapping[str, torch.Tensor]) -> list[ModuleInfo]:
    """The modules of a kohya / LyCORIS LoRA, their part by their name's prefix."""
    parts = {f"{prefix}_": part for part, prefix in KOHYA_PREFIXES.items()}
    infos = []
    for module, tensors in kohya_modules(lora).items():
        part = next((part for prefix, part in parts.items() if module.startswith(prefix)), "other")
        try:
            _, rank, alpha = family_of(tensors).from_kohya(tensors)
        except ValueError:  # a LyCORIS algorithm that PEFT does not train
            infos.append(ModuleInfo(part, lycoris_kind(tensors)))
            continue
        infos.append(ModuleInfo(part, lycoris_kind(tensors), rank, alpha, "dora_scale" in tensors))
    return infos


def lycoris_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """The LoRA / LyCORIS algorithm of a kohya module, by its tensor names."""
    for start, kind in LYCORIS_KINDS.items():
        if any(name.startswith(start) for name in tensors):
            return kind
    return f"unknown ({', '.join(sorted(tensors))})"


def diffusers_module_infos(lora: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[ModuleInfo]:
    """The modules of a diffusers LoRA file, with the alphas its PEFT configs give them."""
    if not is_diffusers_lora(lora):
        raise ValueError(f"neither a kohya nor a diffusers LoRA file (keys such as {next(iter(lora))}).")
    infos = []
    for part, peft_lora in diffusers_to_peft(lora, metadata).items():
        family = FAMILIES[PEFT_TYPES[peft_lora.config.peft_type.value]]
        for path, tensors in peft_modules(peft_lora.state).items():
            kohya = family.to_kohya(tensors, module_scale(peft_lora.config, path))
            _, rank, alpha = family.from_kohya(kohya)
            infos.append(ModuleInfo(part, lycoris_kind(kohya), rank, alpha, "dora_scale" in kohya))
    return infos


def format_label(file_format: str, modules: list[ModuleInfo], metadata: Mapping[str, str]) -> str:
    """The format line, e.g. `kohya (LyCORIS: DoRA), for AUTOMATIC1111 / ComfyUI`."""
    dora = any(module.dora for module in modules)
    if file_format == "diffusers":
        has_configs = diffusers_lora_metadata(metadata) is not None
        configs = "PEFT configs in metadata" if has_configs else "no configs: alpha = rank"
        return f"diffusers (PEFT{' with DoRA' if dora else ''}; {configs})"
    lycoris = sorted({module.kind for module in modules} - {"LoRA"}) + (["DoRA"] if dora else [])
    label = f"kohya (LyCORIS: {', '.join(lycoris)})" if lycoris else "kohya"
    if "(IA)³" in lycoris:
        return f"{label}, for AUTOMATIC1111 (ComfyUI and Forge read no (IA)³)"
    return f"{label}, for AUTOMATIC1111 / ComfyUI"


def module_lines(modules: list[ModuleInfo]) -> list[str]:
    """One line per part: modules (by kind), ranks, alphas (distinct values, with counts), DoRA."""
    lines = []
    for part in sorted({module.part for module in modules}, key=PARTS_ORDER.index):
        own = [module for module in modules if module.part == part]
        kinds = ", ".join(f"{count} {kind}" for kind, count in Counter(module.kind for module in own).items())
        line = f"{part}: {len(own)} modules ({kinds})"
        ranked = [module for module in own if module.rank is not None]
        if ranked:
            line += f"; rank {distinct(Counter(module.rank for module in ranked))}"
            alphas = Counter("none (= rank)" if module.alpha is None else f"{module.alpha:g}" for module in ranked)
            line += f"; alpha {distinct(alphas)}"
        dora = sum(module.dora for module in own)
        lines.append(line + (f"; DoRA on {dora}" if dora else ""))
    return lines


def distinct(counts: Counter) -> str:
    """The values with their counts, `4 (x12), 2 (x3)`, or the one value."""
    if len(counts) == 1:
        return str(next(iter(counts)))
    return ", ".join(f"{value} (x{count})" for value, count in counts.most_common())


def shapes(vectors: Mapping[str, torch.Tensor]) -> str:
    """Embedding shapes, `clip_l [2, 768], clip_g [2, 1280]`."""
    keys = [key for key in EMBEDDING_KEYS if key in vectors] + [key for key in vectors if key not in EMBEDDING_KEYS]
    return ", ".join(f"{key} {list(vectors[key].shape)}" for key in keys)


def tokens_line(metadata: Mapping[str, str]) -> str:
    """The pivotal-tuning tokens the file records, `tokens: TOK -> <s0><s1>`."""
    if TOKENS_METADATA_KEY not in metadata:
        return "tokens: none recorded (load_for_diffusers numbers them <s0>, <s1>, ...)"
    by_abstraction = json.loads(metadata[TOKENS_METADATA_KEY])
    return "tokens: " + "; ".join(f"{word} -> {''.join(tokens)}" for word, tokens in by_abstraction.items())


def metadata_lines(metadata: Mapping[str, str]) -> list[str]:
    """The metadata's count, then each key and its value as `shown`."""
    lines = [f"metadata: {len(metadata)} keys"]
    return lines + [f"  {key}: {shown(key, metadata[key])}" for key in sorted(metadata)]


def shown(key: str, value: str) -> str:
    """A metadata value on one line, shortened; hidden where it may be a secret."""
    if SECRET_KEY.search(key) or SECRET_VALUE.search(value):
        return "<hidden>"
    value = " ".join(value.split())
    if len(value) > MAX_VALUE_LENGTH:
        return f"{value[:MAX_VALUE_LENGTH]}... ({len(value)} characters)"
    return value

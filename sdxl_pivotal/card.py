"""The output folder's model card (`README.md`): what was trained, and code that loads it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import long_prompts
from .export import LORA_WEIGHTS_NAME, embeddings_file_name, output_name, save_text
from .tokens import PivotalTokens

SETTINGS = (
    "resolution",
    "adapter",
    "rank",
    "lora_alpha",
    "use_dora",
    "lora_target",
    "conv_rank",
    "unet_block_lr",
    "network_weights",
    "optimizer",
    "learning_rate",
    "text_encoder_lr",
    "lr_scheduler",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "snr_gamma",
    "noise_offset",
    "train_text_encoder",
    "train_text_encoder_ti",
    "train_text_encoder_ti_frac",
    "token_abstraction",
    "clip_skip",
    "max_token_length",
    "mixed_precision",
    "seed",
)


def diffusers_code(
    args: argparse.Namespace, tokens: PivotalTokens | None, repo_id: str | None = None, folder: Path | None = None
) -> str:
    """Copy-paste inference code for diffusers, with the run's actual file names and token strings, from the Hub
    repo when the run was pushed, else from the output folder: the recipe of `load_for_diffusers` for this run's
    files (read from `folder`, default the output folder), as diffusers' own calls where they do exactly what it
    does, else that loader itself."""
    from .formats.load import diffusers_reads_exactly

    prompt = tokens.substitute(args.instance_prompt) if tokens else args.instance_prompt
    clip_skip = f", clip_skip={args.clip_skip}" if args.clip_skip is not None else ""
    exact = diffusers_reads_exactly(Path(folder or args.output_dir) / LORA_WEIGHTS_NAME)
    loading = diffusers_loading_code(args, tokens, repo_id) if exact else our_loading_code(args, tokens, repo_id)
    imports, body = loading
    call = f'image = pipe("{prompt}"{clip_skip}).images[0]'
    if long_prompts(args.max_token_length):
        # diffusers' pipeline truncates prompt strings at 77 tokens: give it the long embeddings training used.
        note = f"# this trainer's encoding of prompts up to {args.max_token_length} tokens"
        imports = [*imports, f"from sdxl_pivotal.prompts import pipeline_embeddings  {note}"]
        embeds = f'pipeline_embeddings(pipe, "{prompt}", None, {args.max_token_length}, {args.clip_skip})'
        call = f"image = pipe(**{embeds}).images[0]"
    lines = [
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        *imports,
        "",
        "pipe = StableDiffusionXLPipeline.from_pretrained(",
        f'    "{args.pretrained_model_name_or_path}", dtype=torch.float16',
        ').to("cuda")',
        *body,
        call,
    ]
    return "\n".join(lines)


def diffusers_loading_code(
    args: argparse.Namespace, tokens: PivotalTokens | None, repo_id: str | None
) -> tuple[list[str], list[str]]:
    """(imports, lines) loading a LoRA file that diffusers reads exactly: `load_lora_weights`, then the new tokens'
    embeddings with `load_textual_inversion` for each encoder, as `load_for_diffusers` loads them."""
    where = repo_id or output_name(args.output_dir)
    imports = []
    body = [f'pipe.load_lora_weights("{where}", weight_name="{LORA_WEIGHTS_NAME}")']
    if tokens:
        emb_name = embeddings_file_name(args.output_dir)
        if repo_id:
            imports.append("from huggingface_hub import hf_hub_download")
        imports.append("from safetensors.torch import load_file")
        token_list = ", ".join(f'"{t}"' for t in tokens.all_tokens)
        body += [
            "# the new tokens' embeddings, one row per token, for each text encoder",
            f'state = load_file(hf_hub_download("{repo_id}", "{emb_name}"))'
            if repo_id
            else f'state = load_file("{where}/{emb_name}")',
            f"tokens = [{token_list}]",
            'pipe.load_textual_inversion(state["clip_l"], token=tokens, '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            'pipe.load_textual_inversion(state["clip_g"], token=tokens, '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
            "# pool at the end-of-text token, as in training and in the UIs (SDXL's configs say 2: transformers",
            "# would pool at the new tokens)",
            "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id",
        ]
    return imports, body


def our_loading_code(
    args: argparse.Namespace, tokens: PivotalTokens | None, repo_id: str | None
) -> tuple[list[str], list[str]]:
    """(imports, lines) loading the run's files with `load_for_diffusers`, for files diffusers alone does not load
    exactly (LoHa, LoKr, (IA)³; DoRA in the text encoders)."""
    reason = (
        "diffusers' load_lora_weights reads no LoHa, LoKr or (IA)³"
        if args.adapter != "lora"
        else "diffusers' load_lora_weights drops the text encoders' DoRA magnitudes"
    )
    files = [LORA_WEIGHTS_NAME] + ([embeddings_file_name(args.output_dir)] if tokens else [])
    imports = [f"from sdxl_pivotal.formats import load_for_diffusers  # this trainer's loader: {reason}"]
    if repo_id:
        imports.insert(0, "from huggingface_hub import snapshot_download")
        where = "folder"
        patterns = ", ".join(f'"{file}"' for file in files)
        body = [f'folder = snapshot_download("{repo_id}", allow_patterns=[{patterns}])']
    else:
        where, body = f'"{output_name(args.output_dir)}"', []
    token_list = ", ".join(f'"{t}"' for t in tokens.all_tokens) if tokens else ""
    returned = f"  # also the new tokens' embeddings: tokens = [{token_list}]" if tokens else ""
    body.append(f"tokens = load_for_diffusers(pipe, {where}){returned}")
    return imports, body


def long_prompts_note(args: argparse.Namespace) -> str:
    """With --max_token_length 150/225: how diffusers and the UIs read prompts of that length ("" otherwise)."""
    if not long_prompts(args.max_token_length):
        return ""
    return (
        f"\nTrained on captions of up to {args.max_token_length} tokens (`--max_token_length`, kohya's encoding: "
        "75-token chunks, the inner start and end tokens dropped). diffusers' pipeline cuts a prompt string at 77 "
        "tokens, hence the embeddings above. AUTOMATIC1111 and ComfyUI read long prompts in 75-token chunks too, "
        "keeping each chunk's start and end tokens (A1111 also breaks chunks at commas): close to, not exactly, "
        "the training's conditioning.\n"
    )


def ui_instructions(args: argparse.Namespace, tokens: PivotalTokens | None) -> str:
    """What AUTOMATIC1111, Forge and ComfyUI each do with the run's kohya file and embeddings: folders, trigger
    words, and what each does not do (A1111's DoRA, Forge's bundled embeddings, ComfyUI's "lora key not loaded",
    (IA)³ in Forge and ComfyUI)."""
    from .formats.kohya import embedding_name, kohya_file_name

    name = output_name(args.output_dir)
    kohya, emb_file = kohya_file_name(name), embeddings_file_name(args.output_dir)
    emb_name = emb_file.removesuffix(".safetensors")
    bundled = bool(tokens) and args.bundle_embeddings
    prompt = args.instance_prompt
    first = None
    if tokens:
        # The UIs register one embedding holding every new token: the first abstraction stands for all.
        first, *others = tokens.by_abstraction
        for other in others:
            prompt = " ".join(prompt.replace(other, "").split())

    def trigger(word: str) -> str:
        return prompt.replace(first, word) if first else prompt

    a1111_word = embedding_name(name) if bundled else emb_name
    lora_tag = f"<lora:{name}:1>"
    if args.use_dora:
        a1111 = (
            "**not for this model:** A1111 normalises DoRA's weights over input channels, this model's (PEFT's) "
            "are normalised over output channels; it loads the file without an error and applies other weights."
        )
    else:
        a1111 = f"copy `{kohya}` into `models/Lora/`."
        if bundled:
            a1111 += f" The embeddings are bundled in it and register as the embedding `{a1111_word}`."
        elif tokens:
            a1111 += f" Copy `{emb_file}` into `embeddings/`: it registers as the embedding `{a1111_word}`."
        a1111 += f" Prompt: `{trigger(a1111_word)} {lora_tag}`"
    forge = f"copy `{kohya}` into `models/Lora/`."
    if tokens:
        copy = f"`{emb_file}` into `embeddings/`; it registers as the embedding `{emb_name}`."
        forge += f" Forge does not load the bundled embeddings: copy {copy}" if bundled else f" Copy {copy}"
    forge += f" Prompt: `{trigger(emb_name)} {lora_tag}`"
    comfy = f"copy `{kohya}` into `models/loras/` and add a *Load LoRA* node (model and CLIP)."
    if tokens:
        comfy += f" Copy `{emb_file}` into `models/embeddings/`."
    if bundled:
        comfy += (
            ' ComfyUI does not read the bundled embeddings and prints "lora key not loaded" for their two keys '
            f"(`bundle_emb.{embedding_name(name)}.clip_l`, `.clip_g`); that is harmless."
        )
    comfy += f" Prompt: `{trigger(f'embedding:{emb_name}')}`"
    if args.adapter == "ia3":
        # Forge's and ComfyUI's loaders (comfy/lora.py, comfy/weight_adapter) have no (IA)³.
        forge = '**does not load (IA)³:** its loader reads none of the file\'s tensors ("LoRA version mismatch").'
        comfy = '**does not load (IA)³:** it has no (IA)³ loader and prints "lora key not loaded" for every tensor.'
        applied = (
            "AUTOMATIC1111 applies the trained (IA)³ exactly (its LyCORIS loader); Forge and ComfyUI do not load it"
        )
    elif args.use_dora:
        applied = "Forge and ComfyUI apply this model's DoRA exactly (at strength 1); AUTOMATIC1111 does not"
    else:
        applied = "all three apply the trained weights"
    return f"""## Use it in AUTOMATIC1111, Forge or ComfyUI

The file for them is `{kohya}` ({args.adapter}, kohya / LyCORIS keys): {applied}.

- **AUTOMATIC1111:** {a1111}
- **Forge:** {forge}
- **ComfyUI:** {comfy}
"""


def dylora_section(args: argparse.Namespace) -> str:
    """For a DyLoRA run: what its leading ranks are, and the command that writes them as LoRA files."""
    if args.adapter != "dylora":
        return ""
    name, unit = output_name(args.output_dir), args.dylora_unit
    base = f" --base {args.pretrained_model_name_or_path}" if Path(args.pretrained_model_name_or_path).is_dir() else ""
    ranks = ", ".join(str(rank) for rank in range(unit, min(args.rank, 3 * unit) + 1, unit))
    return f"""
## Smaller ranks (DyLoRA)

Trained as DyLoRA (`--adapter dylora --dylora_unit {unit}`): the files above are an ordinary LoRA of rank
{args.rank}, and its leading ranks {ranks}, ... are trained LoRAs of their own (smaller files, somewhat less
faithful). `python -m sdxl_pivotal.tools extract-dylora {name} --unit {unit}{base}` writes them beside the full
files: `{name}-r{unit}.safetensors` (for the UIs) and `pytorch_lora_weights-r{unit}.safetensors` (diffusers), and so
on for each rank. Each loads like the full files (in the code above:
`weight_name="pytorch_lora_weights-r{unit}.safetensors"`).
"""


def gallery(output_dir: Path, images: list[Path], prompt: str) -> tuple[str, str]:
    """(the card's `widget:` front matter, a markdown gallery) for the final validation images."""
    if not images:
        return "", ""
    relative = [image.relative_to(output_dir).as_posix() for image in images]
    widget = "widget:\n" + "".join(f'- text: "{prompt}"\n  output:\n    url: {path}\n' for path in relative)
    markdown = "\n## Samples\n\n" + " ".join(f"![sample {i}]({path})" for i, path in enumerate(relative)) + "\n"
    return widget, markdown


def model_card(
    args: argparse.Namespace,
    tokens: PivotalTokens | None,
    images: list[Path] = (),
    repo_id: str | None = None,
    folder: Path | None = None,
) -> str:
    """The card of the run whose files are in `folder` (the output folder, or the final set being staged)."""
    name = output_name(args.output_dir)
    prompt = tokens.substitute(args.instance_prompt) if tokens else args.instance_prompt
    trigger = ""
    if tokens:
        pairs = ", ".join(f"`{a}` → `{''.join(t)}`" for a, t in tokens.by_abstraction.items())
        trigger = (
            f"\nPivotal tuning: new tokens {pairs} in both text encoders. Write the tokens themselves in your "
            f"prompts, e.g. `{prompt}`; their embeddings are in `{embeddings_file_name(args.output_dir)}` "
            "(keys `clip_l`, `clip_g`).\n"
        )
    settings = "\n".join(f"| `{key}` | `{getattr(args, key)}` |" for key in SETTINGS)
    validation_prompt = args.validation_prompt or ""
    if tokens:
        validation_prompt = tokens.substitute(validation_prompt)
    widget, samples = gallery(Path(args.output_dir), list(images), validation_prompt)
    return f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
license: openrail++
instance_prompt: "{prompt}"
tags:
- stable-diffusion-xl
- text-to-image
- diffusers
- lora
- template:sd-lora
{widget}---

# {name}

A DreamBooth LoRA for SDXL, trained from `{args.pretrained_model_name_or_path}`.

Prompt: `{prompt}`
{trigger}{samples}
## Use it with diffusers

```python
{diffusers_code(args, tokens, repo_id, folder)}
```
{long_prompts_note(args)}
{ui_instructions(args, tokens)}{dylora_section(args)}
## Training settings

All flags of this run: [`training_config.yaml`](training_config.yaml) (run it again: `--config training_config.yaml`).

| setting | value |
|---|---|
{settings}
"""


def write_model_card(
    output_dir: Path,
    args: argparse.Namespace,
    tokens: PivotalTokens | None,
    images: list[Path] = (),
    repo_id: str | None = None,
) -> Path:
    # The LoRA file is read where it is being written (the final set's staging folder).
    return save_text(model_card(args, tokens, images, repo_id, output_dir), output_dir / "README.md")


# Not uploaded: intermediate training state, tracker logs, the monitor's metrics and control files (monitor.py).
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "metrics.jsonl", "control/**", ".*", ".*/**"]


def hub_api(token: str | None):
    """The network boundary: a `huggingface_hub.HfApi` (tests replace this function with a fake)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def create_hub_repo(args: argparse.Namespace) -> str:
    """Create (or reuse) the model repo before training, so a bad token or name fails early; return its id."""
    name = args.hub_model_id or output_name(args.output_dir)
    return hub_api(args.hub_token).create_repo(repo_id=name, exist_ok=True, repo_type="model").repo_id


def upload_to_hub(output_dir: Path, args: argparse.Namespace, repo_id: str) -> None:
    """Upload the output folder: weights, embeddings, card, validation images; no checkpoints or logs."""
    hub_api(args.hub_token).upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(output_dir),
        commit_message="Upload SDXL DreamBooth LoRA",
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )

"""Turn captions into SDXL's text conditioning with both CLIP encoders.

SDXL conditions the UNet on the penultimate hidden states of CLIP-L and CLIP-G concatenated along the
feature axis ([B, 77, 768 + 1280] on SDXL), and on CLIP-G's pooled, projected output ([B, 1280]).
"""

from __future__ import annotations

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(
    text_encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, sum of hidden sizes], pooled_prompt_embeds [B, hidden of encoder 2]).

    As diffusers' SDXL pipeline: the hidden state `clip_skip + 2` from the end (the penultimate layer when
    `clip_skip` is None), and the pooled output of the last encoder.
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    hidden_states = []
    for encoder, ids in zip(text_encoders, token_ids, strict=True):
        device = next(encoder.parameters()).device  # also for a DistributedDataParallel wrapper
        output = encoder(ids.to(device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[layer])
    pooled = output[0]  # the last encoder (CLIPTextModelWithProjection): projected pooled output
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    return prompt_embeds, pooled


class PromptEncoder:
    """Encodes captions; while the text encoders get no gradient, each distinct caption is encoded once."""

    def __init__(
        self, tokenizers: list, text_encoders: list[torch.nn.Module], clip_skip: int | None, cache: bool = True
    ):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.clip_skip = clip_skip
        self.use_cache = cache  # off when captions rarely repeat (shuffled tags): it would only grow
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.offloaded = False

    def __call__(self, prompts: list[str], trainable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if trainable:
            self.cache.clear()  # encoder weights change every step: nothing cached stays valid
            return self._encode(prompts)
        if not self.use_cache:
            with torch.no_grad():
                return self._encode(prompts)
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing and self.offloaded:
            raise RuntimeError(f"Prompts {missing} were not encoded before the text encoders left the device.")
        if missing:
            with torch.no_grad():
                embeds, pooled = self._encode(missing)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = (embeds[i], pooled[i])
        return (
            torch.stack([self.cache[p][0] for p in prompts]),
            torch.stack([self.cache[p][1] for p in prompts]),
        )

    def encode_all_then_offload(self, prompts: list[str]) -> None:
        """Encode every prompt the rest of training will use, then move the encoders to the CPU: from here on
        every prompt comes from the cache (on SDXL this frees about 1.6 GB of fp16 weights)."""
        self(sorted(set(prompts)), trainable=False)
        for encoder in self.text_encoders:
            encoder.to("cpu")
        self.offloaded = True

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        token_ids = [tokenize(tokenizer, prompts) for tokenizer in self.tokenizers]
        return encode_tokens(self.text_encoders, token_ids, self.clip_skip)

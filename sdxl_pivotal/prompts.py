"""Turn captions into SDXL's text conditioning with both CLIP encoders.

SDXL conditions the UNet on the penultimate hidden states of CLIP-L and CLIP-G concatenated along the
feature axis ([B, 77, 768 + 1280] on SDXL), and on CLIP-G's pooled, projected output ([B, 1280]).

Long prompts (`--max_token_length 150|225`), as kohya's sd-scripts encode them: the caption's first 150 (225)
tokens are cut into 75-token chunks, each wrapped as CLIP expects (`BOS, 75 tokens, EOS`, padded the way each
tokenizer pads), every chunk runs through each encoder, and the hidden states are joined along the sequence
axis keeping the first chunk's BOS, every chunk's 75 inner positions and the last chunk's final position
([B, 75 n + 2, 768 + 1280]); the pooled output is the first chunk's. Every caption gets n chunks, so a batch
shares one length. One chunk (the default, or 75) is exactly diffusers' 77-token encoding.
"""

from __future__ import annotations

import logging

import torch

from .args import MAX_TOKEN_LENGTHS

logger = logging.getLogger(__name__)


def chunk_count(tokenizer, max_token_length: int | None) -> int:
    """Chunks per caption: max_token_length / 75 (SDXL's CLIP: 77 positions less BOS and EOS); 1 by default."""
    return 1 if max_token_length is None else max_token_length // (tokenizer.model_max_length - 2)


def tokenize(tokenizer, prompts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids [B, chunks, 77]: each prompt's first `max_token_length` tokens (default 75, the truncation of
    diffusers' pipeline) in chunks of 75, each `BOS, tokens, EOS` padded with the tokenizer's pad token (the
    end-of-text token for CLIP-L, "!" for SDXL's CLIP-G); chunks past the text hold `BOS, EOS` and padding."""
    width = tokenizer.model_max_length
    inner = width - 2
    chunks = chunk_count(tokenizer, max_token_length)
    texts = tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=chunks * inner).input_ids
    rows = []
    for ids in texts:
        row = []
        for start in range(0, chunks * inner, inner):
            chunk = [tokenizer.bos_token_id, *ids[start : start + inner], tokenizer.eos_token_id]
            row.append(chunk + [tokenizer.pad_token_id] * (width - len(chunk)))
        rows.append(row)
    return torch.tensor(rows)


def warn_if_truncated(tokenizer, captions: list[str], max_token_length: int | None) -> None:
    """One warning when captions have more tokens than training reads, naming how many and the flag that helps."""
    limit = chunk_count(tokenizer, max_token_length) * (tokenizer.model_max_length - 2)
    distinct = sorted(set(captions))
    lengths = [len(ids) for ids in tokenizer(distinct, add_special_tokens=False, verbose=False).input_ids]
    longer = sum(length > limit for length in lengths)
    if not longer:
        return
    wanted = next((n for n in MAX_TOKEN_LENGTHS if n >= max(lengths)), MAX_TOKEN_LENGTHS[-1])
    remedy = f" Pass --max_token_length {wanted} to read more of them." if wanted > limit else ""
    logger.warning(
        "%d of %d distinct captions have more than %d tokens (the longest %d); the words past token %d are not "
        "seen in training.%s",
        longer,
        len(distinct),
        limit,
        max(lengths),
        limit,
        remedy,
    )


def join_chunks(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B x chunks, 77, C] hidden states -> [B, 75 chunks + 2, C]: the first chunk's BOS, each chunk's 75 inner
    positions in order, the last chunk's final position (kohya's join); one chunk comes back unchanged."""
    hidden = hidden.reshape(-1, chunks, *hidden.shape[1:])
    inner = hidden[:, :, 1:-1].reshape(hidden.shape[0], -1, hidden.shape[-1])
    return torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1)


def encode_tokens(
    text_encoders: list[torch.nn.Module], token_ids: list[torch.Tensor], clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, chunks, 77] of each encoder -> (prompt_embeds [B, 75 chunks + 2, sum of hidden sizes],
    pooled_prompt_embeds [B, hidden of encoder 2]).

    As diffusers' SDXL pipeline: the hidden state `clip_skip + 2` from the end (the penultimate layer when
    `clip_skip` is None), and the pooled output of the last encoder, of the first chunk.
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    hidden_states = []
    for encoder, ids in zip(text_encoders, token_ids, strict=True):
        device = next(encoder.parameters()).device  # also for a DistributedDataParallel wrapper
        batch, chunks, width = ids.shape
        output = encoder(ids.reshape(batch * chunks, width).to(device), output_hidden_states=True)
        hidden_states.append(join_chunks(output.hidden_states[layer], chunks))
    pooled = output[0][::chunks]  # the last encoder (CLIPTextModelWithProjection): projected, first chunk
    prompt_embeds = torch.cat(hidden_states, dim=-1)
    return prompt_embeds, pooled


class PromptEncoder:
    """Encodes captions; while the text encoders get no gradient, each distinct caption is encoded once."""

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list[torch.nn.Module],
        clip_skip: int | None,
        cache: bool = True,
        max_token_length: int | None = None,
    ):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length  # fixed for the encoder's life, so the cache is keyed by prompt
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
        token_ids = [tokenize(tokenizer, prompts, self.max_token_length) for tokenizer in self.tokenizers]
        return encode_tokens(self.text_encoders, token_ids, self.clip_skip)


def pipeline_embeddings(
    pipeline, prompt: str, negative_prompt: str | None, max_token_length: int | None, clip_skip: int | None
) -> dict[str, torch.Tensor]:
    """The text inputs of a diffusers SDXL pipeline call (`prompt_embeds`, `pooled_prompt_embeds` and their
    negatives) encoded as training encodes captions: diffusers' own `encode_prompt` truncates at 77 tokens.

    As diffusers: no negative prompt gives zeros when the model's config asks for them
    (`force_zeros_for_empty_prompt`, SDXL base), else the negative prompt (or "") is encoded alike."""
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
    encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
    encode = PromptEncoder(tokenizers, encoders, clip_skip, cache=False, max_token_length=max_token_length)
    with torch.no_grad():
        embeds, pooled = encode([prompt], trainable=False)
        if negative_prompt is None and pipeline.config.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = encode([negative_prompt or ""], trainable=False)
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
    }

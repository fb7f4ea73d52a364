"""Pivotal tuning: new tokens (`<s0><s1>` for `TOK`) in both CLIP tokenizers and encoders, of which only
the new embedding rows are trained.

The reference trains the whole token-embedding matrix (49 410 x (768 + 1280) numbers on SDXL, with AdamW
state for all of them) and copies the old rows back after each step. Here each encoder's embedding is
wrapped: the old matrix stays frozen and bit-identical, and the new rows live in a separate small
parameter, the only embedding numbers the optimizer ever sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

# Keys of the embeddings file, as A1111, ComfyUI and diffusers users expect for SDXL.
EMBEDDING_KEYS = ("clip_l", "clip_g")


@dataclass
class PivotalTokens:
    """Which new token strings stand for which abstraction: {"TOK": ["<s0>", "<s1>"], ...}."""

    by_abstraction: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_flags(cls, token_abstraction: str, tokens_per_abstraction: int) -> PivotalTokens:
        abstractions = [a.strip() for a in token_abstraction.split(",") if a.strip()]
        mapping, n = {}, 0
        for abstraction in abstractions:
            mapping[abstraction] = [f"<s{n + i}>" for i in range(tokens_per_abstraction)]
            n += tokens_per_abstraction
        return cls(mapping)

    @property
    def all_tokens(self) -> list[str]:
        return [token for tokens in self.by_abstraction.values() for token in tokens]

    def substitute(self, prompt: str) -> str:
        """ "a photo of TOK dog" -> "a photo of <s0><s1> dog"."""
        for abstraction, tokens in self.by_abstraction.items():
            prompt = prompt.replace(abstraction, "".join(tokens))
        return prompt

    def warn_if_unused(self, prompts: list[str]) -> None:
        """One warning naming every abstraction that occurs in none of the prompts and captions."""
        unused = [a for a in self.by_abstraction if not any(a in p for p in prompts)]
        if unused:
            logger.warning(
                "--token_abstraction %s appears in no prompt or caption: its new tokens will not be trained. "
                "Put it in --instance_prompt or the captions (e.g. 'a photo of %s dog').",
                ", ".join(unused),
                unused[0],
            )


class TokenEmbeddingWithNewRows(torch.nn.Module):
    """A token embedding whose ids from `first_new_id` on read from `new_rows`, a separate parameter.

    The wrapped `base` embedding (resized to hold the new ids) stays frozen; gradients reach only
    `new_rows` ([num_new_tokens, hidden], float32).
    """

    def __init__(self, base: torch.nn.Embedding, first_new_id: int, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_rows = torch.nn.Parameter(new_rows.float())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        is_new = (input_ids >= self.first_new_id).unsqueeze(-1)
        new = self.new_rows.to(embeds.dtype)[(input_ids - self.first_new_id).clamp(min=0)]
        return torch.where(is_new, new, embeds)


def initial_rows(embedding: torch.nn.Embedding, count: int, initializer_ids: list[int] | None) -> torch.Tensor:
    """Start values of new rows: the mean embedding of an initializer word, or, as the reference does,
    Gaussian noise with the standard deviation of the existing vocabulary's embeddings."""
    weight = embedding.weight.detach().float()
    if initializer_ids:
        return weight[initializer_ids].mean(dim=0, keepdim=True).repeat(count, 1)
    # Drawn on the CPU whatever the device (same numbers everywhere; the planner's models are on `meta`).
    return torch.randn(count, weight.shape[1]).to(weight.device) * weight.std()


def add_new_tokens(
    tokenizers: list, text_encoders: list[torch.nn.Module], tokens: PivotalTokens, initializer_token: str | None
) -> None:
    """Add the new tokens to every tokenizer and wrap every encoder's embedding (in place)."""
    new = tokens.all_tokens
    for i, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders, strict=True)):
        clashing = [t for t in new if t in tokenizer.get_vocab()]
        if clashing:
            raise InputError(
                f"Tokenizer {i + 1} already has the token(s) {', '.join(clashing)}: this model was probably "
                "fine-tuned with pivotal tuning before. Use the base model, or load those embeddings instead."
            )
        first_new_id = len(tokenizer)
        if tokenizer.add_tokens(new) != len(new):
            raise InputError(f"Tokenizer {i + 1} did not accept the new tokens {new}.")
        initializer_ids = None
        if initializer_token:
            initializer_ids = tokenizer(initializer_token, add_special_tokens=False).input_ids
            if not initializer_ids:
                raise InputError(f"--initializer_token {initializer_token!r} gives no token.")
        encoder.resize_token_embeddings(len(tokenizer))
        pool_at_end_of_text(encoder, tokenizer)
        base = encoder.get_input_embeddings()
        base.requires_grad_(False)
        rows = initial_rows(base, len(new), initializer_ids)
        encoder.set_input_embeddings(TokenEmbeddingWithNewRows(base, first_new_id, rows))


def pool_at_end_of_text(encoder: torch.nn.Module, tokenizer) -> None:
    """Make a CLIP text encoder pool at the end-of-text token, as CLIP itself, ComfyUI and AUTOMATIC1111 do.

    SDXL's text-encoder configs carry the old `eos_token_id: 2`, with which transformers pools each prompt at its
    highest token id. That is the end-of-text token until new tokens are added above it; then the pooled
    embedding (SDXL's `text_embeds` conditioning, from encoder 2) would be read at `<s1>` instead, in training
    and in diffusers, while the UIs read it at the end of the text (transformers#24650, diffusers#10754). With
    the real id, transformers pools at the first end-of-text token: the same as before for prompts without new
    tokens."""
    encoder.config.eos_token_id = tokenizer.eos_token_id
    for module in encoder.modules():  # the CLIP text model caches the id (on itself or its `text_model`)
        if isinstance(getattr(module, "eos_token_id", None), int):
            module.eos_token_id = tokenizer.eos_token_id


def new_token_rows(text_encoders: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [encoder.get_input_embeddings().new_rows for encoder in text_encoders]


def embeddings_state(text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trained rows as {"clip_l": [n, 768], "clip_g": [n, 1280]} (SDXL sizes), float32 on the CPU."""
    rows = new_token_rows(text_encoders)
    return {key: r.detach().float().contiguous().cpu() for key, r in zip(EMBEDDING_KEYS, rows, strict=True)}

"""Text-embedding caching: cached embeddings equal live encoding; after offloading, the encoders are idle."""

from __future__ import annotations

import pytest
import torch

from sdxl_pivotal.prompts import PromptEncoder


def test_cache_equals_live_encoding_and_offload_serves_everything(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    cached = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], encoders, None)
    live = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], encoders, None, cache=False)
    prompts = ["a photo of TOK toy", "", "a toy figure, red"]
    calls = []
    for encoder in encoders:
        encoder.register_forward_hook(lambda *_: calls.append(1))

    cached.encode_all_then_offload(prompts)
    assert cached.offloaded and len(calls) == 2, "one batched call per encoder, then no more"
    embeds, pooled = cached(["a toy figure, red", "a photo of TOK toy"], trainable=False)
    assert len(calls) == 2
    with torch.no_grad():
        live_embeds, live_pooled = live(["a toy figure, red", "a photo of TOK toy"], trainable=False)
    torch.testing.assert_close(embeds, live_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, live_pooled, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not encoded before the text encoders left the device"):
        cached(["a prompt never seen"], trainable=False)

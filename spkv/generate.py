"""Generation with the compressed cache, with an honest report of what the cache held and how fast."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from spkv.cache import SPKVCache
from spkv.compat import CACHE_ARG
from spkv.stats import cache_stats


class _StepClock(LogitsProcessor):
    """Time stamps each generation step without touching the scores: the first call follows prefill."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class GenerationReport:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    cache: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)

    def summary(self) -> str:
        c = self.cache
        mb = 1024**2
        return "\n".join([
            f"prompt tokens {self.prompt_tokens}, generated {self.new_tokens}",
            f"density (out-of-window pairs kept) {100 * c['density']:.1f}% mean over layers x heads, "
            f"{100 * c['density_token_weighted']:.1f}% token-weighted ({c['kept']} of {c['decided']} pairs)",
            f"KV held by gated layers {c['bytes_held'] / mb:.2f} MB vs {c['bytes_full'] / mb:.2f} MB for a full cache "
            f"({c['compression']:.2f}x smaller)",
            f"prefill {self.prefill_tokens_per_s:.1f} tokens/s, decode {self.decode_tokens_per_s:.1f} tokens/s",
        ])


def generate_with_report(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    prefill_chunk_size: int | None = 512,
    do_sample: bool = False,
    **generate_kwargs: Any,
) -> GenerationReport:
    """Generate from one prompt on a converted model and report the cache it used."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    n_prompt = enc.input_ids.shape[1]
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(
            f"The prompt has {n_prompt} tokens; with {max_new_tokens} new tokens that exceeds the model's {limit} "
            "positions. Shorten the prompt or lower --max-new-tokens."
        )
    clock = _StepClock()
    cache = SPKVCache(model)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc, **{CACHE_ARG: cache}, max_new_tokens=max_new_tokens, do_sample=do_sample,
            prefill_chunk_size=prefill_chunk_size if prefill_chunk_size and prefill_chunk_size < n_prompt else None,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=tokenizer.pad_token_id, **generate_kwargs,
        )
    new = out[0, n_prompt:]
    prefill_s = clock.stamps[0] - start
    decode_steps = len(clock.stamps) - 1
    decode_s = clock.stamps[-1] - clock.stamps[0]
    return GenerationReport(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=n_prompt,
        new_tokens=len(new),
        prefill_tokens_per_s=n_prompt / prefill_s,
        decode_tokens_per_s=decode_steps / decode_s if decode_steps else float("nan"),
        cache=cache_stats(cache).to_dict(),
        token_ids=new.tolist(),
    )

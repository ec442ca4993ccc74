"""A deploy-time memory budget: pick tau from the user's own text for a density or a KV size.

Users think in memory ("keep 20%", "fit the cache in 2 GB"), not in tau. SP-KV's decision is
u >= tau on a utility fixed when a pair is written, so on recorded utilities the density is a step
function of tau that a bisection inverts. The utilities of a layer depend on what the layers below
kept, so on tau itself: record at the current tau, solve, record again at the new tau, until tau
stops moving; the density reported is the one measured at the tau returned. The KV size at a
context T follows from it: the window's pairs plus the kept share of the rest, for the gated
layers, plus what the ungated layers hold (full or sliding, exactly as transformers' own layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from spkv.convert import is_converted, record_gates, set_threshold
from spkv.density import out_of_window_mask


@dataclass
class BudgetResult:
    """What `calibrate` chose and what it gives on the calibration text."""

    threshold: float
    density: float  # mean over gated layers x KV heads (the paper's number)
    density_token_weighted: float  # kept / decided pairs over all gated heads (what bytes follow)
    context: int  # tokens the KV size is computed for
    batch_size: int
    kv_bytes: int  # predicted KV bytes at `context` x `batch_size`, every layer
    kv_bytes_full: int  # a full cache of the same shape
    tokens: int  # calibration tokens the utilities came from

    def summary(self) -> str:
        mib = 2**20
        return (f"tau {self.threshold:.4f}: density {100 * self.density:.1f}% (mean over layers x heads, "
                f"{100 * self.density_token_weighted:.1f}% token-weighted) on {self.tokens} calibration tokens; "
                f"KV at {self.context} tokens x {self.batch_size}: {self.kv_bytes / mib:.1f} MiB "
                f"({self.kv_bytes_full / mib:.1f} MiB full)")


def utilities(model: torch.nn.Module, input_ids: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per gated layer, [Hkv, n] utilities u of the out-of-window pairs of every calibration
    sequence (the pairs whose keep decision the cache has taken by the end of the sequence)."""
    cfg = model.spkv_config
    per_layer: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for ids in input_ids:
            ids = ids.reshape(1, -1).to(model.device)
            with record_gates(model) as gates:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            counted = out_of_window_mask(ids.shape[1], cfg.window, None, cfg.sinks)[0]
            for layer, logits in gates.items():
                per_layer.setdefault(layer, []).append(torch.sigmoid(logits[0, counted.to(logits.device)].float()).T.cpu())
    return [torch.cat(per_layer[layer], dim=1) for layer in sorted(per_layer)]


def density_at(us: list[torch.Tensor], tau: float) -> tuple[float, float]:
    """(mean over layers x heads, token-weighted) density of the recorded utilities at tau."""
    kept = [(u >= tau).double() for u in us]
    mean = float(torch.cat([k.mean(dim=1) for k in kept]).mean())
    weighted = float(sum(k.sum() for k in kept) / sum(k.numel() for k in kept))
    return mean, weighted


def predicted_kv_bytes(config: Any, context: int, batch_size: int, element_size: int, gated: Iterable[int] = (),
                       window: int = 0, kept_share: float = 1.0, slack: int = 0) -> int:
    """KV bytes a cache holds after `context` tokens: full-attention layers every pair, sliding ones
    at most their window, gated (SP-KV) layers their window, its `slack` spare slots (the pairs of
    batched window exits, SPKVCache's exit_batch - 1) and `kept_share` of the pairs that left it.
    With no gated layers, what a full cache holds. The one KV-size formula (the benchmarks use it)."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_pair = 2 * batch_size * text.num_key_value_heads * head_dim * element_size
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    sliding = getattr(text, "sliding_window", None) or context
    gated = set(gated)
    pairs = 0.0
    for i, kind in enumerate(types):
        if i in gated:
            pairs += min(window, context) + slack + kept_share * max(0, context - window)
        else:
            pairs += context if kind == "full_attention" else min(context, sliding)
    return int(pairs * per_pair)


def model_kv_bytes(model: torch.nn.Module, context: int, batch_size: int, kept_share: float) -> tuple[int, int]:
    """(predicted, full) KV bytes of a converted model at `context` x `batch_size`, keeping
    `kept_share` of the out-of-window pairs of its gated layers (with the default SPKVCache's ring)."""
    from spkv.cache import EXIT_BATCH

    element = next(model.parameters()).element_size()
    cfg = model.spkv_config
    return (predicted_kv_bytes(model.config, context, batch_size, element, cfg.layers, cfg.window, kept_share, EXIT_BATCH - 1),
            predicted_kv_bytes(model.config, context, batch_size, element))


def calibrate(model: torch.nn.Module, texts: Iterable[str] | None = None, tokenizer: Any = None, *,
              input_ids: Iterable[torch.Tensor] | None = None, density: float | None = None,
              kv_bytes_limit: int | None = None, context: int | None = None, batch_size: int = 1,
              apply: bool = True, max_iterations: int = 8) -> BudgetResult:
    """Set tau so the model keeps `density` of the out-of-window pairs (mean over layers x heads)
    on the calibration text, or so its KV cache at `context` x `batch_size` fits `kv_bytes_limit`.

    Give texts with a tokenizer, or input_ids. The result reports the density and the bytes;
    `apply=False` only reports (tau is put back). Errors name what to change when a budget cannot be met (below the
    window and the ungated layers, nothing to calibrate on)."""
    if not is_converted(model):
        raise ValueError("calibrate needs an SP-KV model: spkv.load_adapter(model, path) or spkv.convert(model) first.")
    if (density is None) == (kv_bytes_limit is None):
        raise ValueError("Give exactly one budget: density=D (in (0, 1]) or kv_bytes_limit=BYTES.")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if input_ids is None:
        if texts is None or tokenizer is None:
            raise ValueError("Give calibration texts with their tokenizer, or input_ids.")
        input_ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids[0] for t in texts]
    input_ids = [torch.as_tensor(ids) for ids in input_ids]
    cfg = model.spkv_config
    us = utilities(model, input_ids)  # at the model's current tau
    if not us or us[0].shape[1] == 0:
        raise ValueError(f"The calibration text is too short: no pair left the {cfg.window}-token window. Give longer text.")
    tokens = sum(int(i.numel()) for i in input_ids)
    context = context or max(int(i.numel()) for i in input_ids)
    if kv_bytes_limit is not None:
        floor, _ = model_kv_bytes(model, context, batch_size, 0.0)
        if kv_bytes_limit < floor:
            raise ValueError(f"{kv_bytes_limit / 2**20:.1f} MiB is below the smallest cache at {context} tokens x {batch_size} "
                             f"({floor / 2**20:.1f} MiB: the {cfg.window}-token window and the ungated layers). Allow more "
                             "memory, or use a shorter context or a smaller batch.")

    def fits(us: list[torch.Tensor], tau: float) -> bool:  # monotone: a higher tau keeps fewer pairs
        mean, weighted = density_at(us, tau)
        return mean <= density if density is not None else model_kv_bytes(model, context, batch_size, weighted)[0] <= kv_bytes_limit

    def solve(us: list[torch.Tensor]) -> float:
        """The smallest tau that fits, placed midway between two recorded utilities, so that tiny
        numerical differences between a full forward and the chunked cache cannot flip a decision."""
        values = torch.unique(torch.cat([u.flatten() for u in us]))  # sorted
        cuts = torch.cat([values.new_zeros(1), (values[1:] + values[:-1]) / 2, values.new_ones(1) + 1e-6])
        lo, hi = 0, len(cuts) - 1  # fits(cuts[hi]) always: nothing is kept above every utility
        if fits(us, float(cuts[0])):
            return 0.0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(us, float(cuts[mid])) else (mid, hi)
        return min(1.0, float(cuts[hi]))

    old_tau, tau = cfg.threshold, cfg.threshold
    for _ in range(max_iterations):
        new = solve(us)
        if abs(new - tau) < 1e-6:
            break
        tau = new
        set_threshold(model, tau)
        us = utilities(model, input_ids)
    if not apply:
        set_threshold(model, old_tau)
    mean, weighted = density_at(us, tau)
    held, full = model_kv_bytes(model, context, batch_size, weighted)
    return BudgetResult(tau, mean, weighted, context, batch_size, held, full, tokens)

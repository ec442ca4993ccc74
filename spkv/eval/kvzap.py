"""KVzap-style learned surrogate: the strongest kind of post-hoc baseline for SP-KV.

KVzap trains a small regressor per layer, on hidden states of the frozen model, to predict an
attention-importance score, then prunes by thresholding the prediction. Our surrogate does the same
with spkv's rule: a linear map (ridge regression, closed form) from the attention input to, per KV
head, log(max attention the pair receives once it has left the local window) in the dense model,
max over the group's query heads and over queries t >= s + window. The difference from SP-KV is the
training signal: SP-KV's predictor is learned through the next-token loss; this one is fitted to
an attention statistic after the fact.

At evaluation the regressors stand in the predictor's slot of a converted model (`installed`), so
they score each pair when it is written, and the `kvzap` policy thresholds the raw prediction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from spkv.compat import attention_module, attention_probabilities
from spkv.convert import _decoder_layers, predictors
from spkv.results import atomic_write

_EPS = 1e-6  # floor of the attention target before the log


@dataclass
class KVzapConfig:
    sequences: int = 16  # training-split sequences used for the fit
    seq_len: int = 1024
    ridge: float = 1e-1  # L2 penalty (relative to the mean diagonal of X^T X)
    seed: int = 0


class KVzapRegressor(nn.Module):
    """Linear attention input [B, T, hidden] -> predicted log importance [B, T, Hkv].

    Has the predictor's `config` and `recording` attributes so the predictor hook can call it."""

    def __init__(self, hidden_size: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.linear = nn.Linear(hidden_size, num_kv_heads)
        self.config = None
        self.recording: dict[int, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states.to(self.linear.weight.dtype))


def importance_target(weights: torch.Tensor, num_kv_heads: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [B, H, T, T] (dense attention probabilities) -> (log importance [B, T, Hkv], rows [T]).

    rows marks the keys that some query sees from outside the window (s <= T - 1 - window)."""
    b, h, t, _ = weights.shape
    grouped = weights.view(b, num_kv_heads, h // num_kv_heads, t, t).amax(dim=2)  # [B, Hkv, Tq, Tk]
    pos = torch.arange(t, device=weights.device)
    far = (pos.view(t, 1) - pos.view(1, t)) >= window  # [Tq, Tk]: query past the key's window
    best = grouped.masked_fill(~far, 0.0).amax(dim=2)  # [B, Hkv, Tk]
    return torch.log(best + _EPS).transpose(1, 2), pos <= t - 1 - window


def fit_kvzap(model: nn.Module, sequences: torch.Tensor, window: int, config: KVzapConfig | None = None) -> dict[int, KVzapRegressor]:
    """Fit one regressor per gated layer of a converted model on `sequences` [N, T] (training text).

    The model runs dense (eager attention, to read its probabilities) and unchanged otherwise."""
    config = config or KVzapConfig()
    layers = _decoder_layers(model)
    gated = sorted(predictors(model))
    # Normal equations accumulated over sequences: X^T X [L, d+1, d+1], X^T y [L, d+1, Hkv].
    xtx: dict[int, torch.Tensor] = {}
    xty: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}

    def capture_input(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()

    def accumulate(module, probs):
        i = module.layer_idx
        kv_heads = module.spkv_predictor.num_kv_heads
        target, rows = importance_target(probs.float(), kv_heads, window)
        hidden = inputs.pop(i)
        x = hidden[:, rows].reshape(-1, hidden.shape[-1]).double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        y = target[:, rows].reshape(-1, kv_heads).double()
        xtx[i] = xtx.get(i, 0) + x.T @ x
        xty[i] = xty.get(i, 0) + x.T @ y

    modules = [attention_module(layers[i]) for i in gated]
    handles = [attn.register_forward_pre_hook(capture_input, with_kwargs=True) for attn in modules]
    try:
        with torch.no_grad(), attention_probabilities(model, modules, accumulate):
            for row in tqdm(sequences, desc="kvzap fit", unit="seq", leave=False):
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    regressors = {}
    for i in gated:
        a = xtx[i]
        a = a + config.ridge * a.diagonal()[:-1].mean() * torch.eye(a.shape[0], dtype=a.dtype)
        w = torch.linalg.solve(a, xty[i])  # [d+1, Hkv]
        reg = KVzapRegressor(w.shape[0] - 1, w.shape[1])
        with torch.no_grad():
            reg.linear.weight.copy_(w[:-1].T.float())
            reg.linear.bias.copy_(w[-1].float())
        regressors[i] = reg
    return regressors


@contextmanager
def installed(model: nn.Module, regressors: dict[int, KVzapRegressor]) -> Iterator[None]:
    """Temporarily put the regressors in the predictors' slots: the hook then stages their output."""
    layers = _decoder_layers(model)
    saved = predictors(model)
    if sorted(saved) != sorted(regressors):
        raise ValueError(f"KVzap regressors are for layers {sorted(regressors)} but the model gates {sorted(saved)}.")
    try:
        for i, reg in regressors.items():
            reg.config = saved[i].config
            attention_module(layers[i]).spkv_predictor = reg
        yield
    finally:
        for i, p in saved.items():
            attention_module(layers[i]).spkv_predictor = p


def save_regressors(regressors: dict[int, KVzapRegressor], path: str | Path, metadata: dict[str, Any]) -> None:
    tensors = {f"{i}.{k}": v.contiguous() for i, reg in regressors.items() for k, v in reg.linear.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def regressors_metadata(path: str | Path) -> dict[str, str]:
    """What save_regressors recorded with the weights (e.g. which model they were fitted on)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_regressors(path: str | Path) -> dict[int, KVzapRegressor]:
    tensors = load_file(str(path))
    out = {}
    for i in sorted({int(k.split(".")[0]) for k in tensors}):
        w, b = tensors[f"{i}.weight"], tensors[f"{i}.bias"]
        reg = KVzapRegressor(w.shape[1], w.shape[0])
        reg.linear.load_state_dict({"weight": w, "bias": b})
        out[i] = reg
    return out

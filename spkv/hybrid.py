"""Hybrid local-global layouts designed from SP-KV's learned density, run exactly, and exported.

SP-KV's learned density is structured: a few (layer, KV head) units keep almost every pair, most
keep almost nothing beyond the window. A hybrid makes that structure fixed: *global* units keep
every pair, *local* units only the window. Here a hybrid is an SP-KV model whose predictors are
constants (u = 1 for global units, u ~ 0 for local ones), so everything that runs SP-KV (the exact
full-sequence forward, the compact cache, NLL, tasks, generate) runs a hybrid unchanged and
exactly. A per-layer hybrid (every head of a layer the same) is a plain sliding/full model that
serving engines run natively; `export` writes it as a standard transformers checkpoint.

Designs at a KV budget (the share of out-of-window memory kept = share of global units):
  learned-head   the densest (layer, KV head) units first            (the paper's hybrid)
  learned-layer  the densest layers first (mean over their heads)
  probe-head     the units of the *dense* model with the most attention mass beyond the window on
  probe-layer    held-out text, per unit or per layer (training-free, after DuoAttention / RazorAttention)
  interleave     global layers evenly spaced, budget x layers of them (hand-made; 0.25 -> 3:1)
  random-head    units drawn at random (seeded)                      (baseline)
These choices are ours: the paper gives the result, not the procedure.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from spkv.adapter import PREDICTOR_KEY
from spkv.compat import attention_module, attention_probabilities
from spkv.config import SPKVConfig
from spkv.convert import _decoder_layers, convert, full_attention_layers, is_converted, predictors, set_threshold, update_config
from spkv.results import atomic_write_dir

DESIGNS = ("learned-head", "learned-layer", "probe-head", "probe-layer", "interleave", "random-head")
_OPEN, _CLOSED = 30.0, -30.0  # constant predictor logits: u = 1 - 1e-13 and 1e-13


@dataclass
class HybridLayout:
    """Which gated units stay global. units[i][h]: layer layers[i], KV head h is global."""

    model: str  # the model it was designed for (name as given)
    layers: list[int]
    units: list[list[bool]]
    window: int
    budget: float  # the requested share of global units
    design: str
    seed: int | None = None
    sinks: int = 0  # first tokens every local unit keeps too (0: window only, as sliding-window layers)

    @property
    def global_share(self) -> float:
        flat = [u for row in self.units for u in row]
        return sum(flat) / len(flat)

    @property
    def per_layer(self) -> bool:
        return all(len(set(row)) == 1 for row in self.units)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "global_share": self.global_share}, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | None = None) -> HybridLayout:
        """The layout in `path`; with `model`, an error if it was designed for another model."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"No layout at {path}: write one with `spkv hybrid design`.")
        data = json.loads(Path(path).read_text())
        data.pop("global_share", None)
        layout = cls(**data)
        if model is not None and layout.model and layout.model != model:
            raise ValueError(f"The layout {path} was designed for {layout.model!r}, not {model!r}.")
        return layout


def _check_budget(budget: float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"The KV budget must be in (0, 1] (the share of out-of-window memory kept), got {budget!r}")


def design(scores: list[list[float]], layers: list[int], budget: float, method: str = "learned-head", *,
           model: str = "", window: int = 128, seed: int = 0, sinks: int = 0) -> HybridLayout:
    """A layout keeping `budget` of the units global. scores [layers][KV heads]: for learned-* SP-KV's
    density per unit on held-out text (spkv analyze's density_per_layer_head), for probe-* the dense
    model's attention mass beyond the window (probe_attention); interleave and random read only the shape."""
    _check_budget(budget)
    if method not in DESIGNS:
        raise ValueError(f"Unknown design {method!r}: choose from {', '.join(DESIGNS)}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
    dens = torch.tensor(scores, dtype=torch.float64)
    n_layers, heads = dens.shape
    if n_layers != len(layers):
        raise ValueError(f"scores have {n_layers} rows but {len(layers)} layers are named")
    units = torch.zeros(n_layers, heads, dtype=torch.bool)
    k_units, k_layers = max(1, round(budget * n_layers * heads)), max(1, round(budget * n_layers))
    if method.endswith("-head") and not method.startswith("random"):
        units.view(-1)[torch.argsort(dens.flatten(), descending=True, stable=True)[:k_units]] = True
    elif method.endswith("-layer"):
        units[torch.argsort(dens.mean(1), descending=True, stable=True)[:k_layers]] = True
    elif method == "interleave":  # the last layer of each of k_layers equal groups (0.25 of 8 -> layers 3, 7)
        units[[round((i + 1) * n_layers / k_layers) - 1 for i in range(k_layers)]] = True
    else:
        picks = random.Random(seed).sample(range(n_layers * heads), k_units)
        units.view(-1)[picks] = True
    return HybridLayout(model, list(layers), units.tolist(), window, float(budget), method,
                        seed if method.startswith("random") else None, sinks)


def apply_layout(model: nn.Module, layout: HybridLayout) -> nn.Module:
    """Turn `model` into the hybrid: converted (if needed) on the layout's layers, predictors replaced
    by constants and frozen. The model's own weights (e.g. a trained adapter's) are kept."""
    if not is_converted(model):
        convert(model, SPKVConfig(window=layout.window, threshold=0.5, layers=layout.layers))
    cfg = model.spkv_config
    if cfg.lkv is not None:
        raise ValueError("This is an LKV model (it evicts under budget): apply a hybrid layout to an SP-KV or plain model.")
    if cfg.layers != layout.layers or cfg.window != layout.window:
        raise ValueError(f"The layout is for layers {layout.layers} with window {layout.window}; this model gates "
                         f"{cfg.layers} with window {cfg.window}: design the layout for this model.")
    preds = predictors(model)
    with torch.no_grad():
        for layer, row in zip(layout.layers, layout.units):
            p = preds[layer]
            if len(row) != p.fc2.out_features:
                raise ValueError(f"The layout has {len(row)} KV heads in layer {layer}; this model has {p.fc2.out_features}.")
            p.fc2.weight.zero_()
            p.fc2.bias.copy_(torch.tensor([_OPEN if g else _CLOSED for g in row], dtype=p.fc2.bias.dtype))
            p.requires_grad_(False)
    set_threshold(model, 0.5)
    update_config(model, sinks=layout.sinks, phase="hard")
    model.spkv_hybrid = layout
    return model


def probe_attention(model: nn.Module, sequences: torch.Tensor, window: int) -> tuple[list[int], list[list[float]]]:
    """The probe-* designs' training-free score: (layers, mass [layers][KV heads]), per full-attention
    layer and KV head of the *dense* model, its attention mass on keys beyond the window (t - s >=
    window), averaged over the group's query heads, the queries t >= window and sequences [N, T].
    A unit that looks far on ordinary text is one a window would hurt."""
    if is_converted(model):
        raise ValueError("probe_attention measures the dense model: pass a model that is not converted to SP-KV.")
    if sequences.dim() != 2 or sequences.shape[1] <= window:
        raise ValueError(f"probe_attention needs sequences [N, T] longer than the window ({window}), got {tuple(sequences.shape)}")
    text_config = model.config.get_text_config(decoder=True)
    gated, kv_heads = full_attention_layers(text_config), text_config.num_key_value_heads
    sums = torch.zeros(len(gated), kv_heads, dtype=torch.float64)
    modules = [attention_module(_decoder_layers(model)[i]) for i in gated]
    rows = {id(m): r for r, m in enumerate(modules)}

    def accumulate(module: nn.Module, weights: torch.Tensor) -> None:  # weights [B, H, T, T]
        b, h, t, _ = weights.shape
        pos = torch.arange(t, device=weights.device)
        far = (pos.view(t, 1) - pos.view(1, t)) >= window
        mass = weights.float().masked_fill(~far, 0.0).sum(-1)[:, :, window:].mean(-1)  # [B, H]
        sums[rows[id(module)]] += mass.view(b, kv_heads, h // kv_heads).mean(2).sum(0).double().cpu()

    with torch.no_grad(), attention_probabilities(model, modules, accumulate):
        for row in tqdm(sequences, desc="probe", unit="seq", leave=False):
            model(input_ids=row.unsqueeze(0), use_cache=False)
    return gated, (sums / len(sequences)).tolist()


# -- export: a per-layer hybrid as a plain transformers model ----------------------------------------
# source model_type -> the standard architecture that holds its weights exactly with per-layer
# layer_types (sliding_attention / full_attention) and one sliding_window.
EXPORT_TARGETS = {"llama": "ministral", "mistral": "ministral", "qwen2": "qwen2", "qwen3": "qwen3"}


def export_config(source: Any, layout: HybridLayout) -> Any:
    """The target config: the source's fields, the target model_type, per-layer layer_types and the
    window as sliding_window (a local layer sees the same last `window` tokens as in spkv)."""
    from transformers import AutoConfig

    kind = source.model_type
    if kind not in EXPORT_TARGETS:
        raise ValueError(f"No standard sliding/full architecture holds a {kind!r} model exactly; exportable families: "
                         f"{', '.join(sorted(EXPORT_TARGETS))} (Gemma 3's sliding layers use another rope base, so "
                         "turning its full layers local would change the model).")
    if getattr(source, "attention_bias", False) or getattr(source, "mlp_bias", False):
        raise ValueError("The model has attention or MLP biases, which the export target does not hold.")
    if layout.sinks:
        raise ValueError(f"The layout keeps {layout.sinks} sink tokens in its local layers; a standard sliding-window layer keeps "
                         "none, so the export would change the model: design the layout with sinks=0.")
    if not layout.per_layer:
        raise ValueError("Only a per-layer hybrid (every KV head of a layer global, or every one local) exports to a "
                         "standard model: use the learned-layer, probe-layer or interleave design.")
    layer_types = ["full_attention"] * source.num_hidden_layers
    for layer, row in zip(layout.layers, layout.units):
        if not row[0]:
            layer_types[layer] = "sliding_attention"
    data = {k: v for k, v in source.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    data.update(layer_types=layer_types, sliding_window=layout.window, use_sliding_window=True, max_window_layers=0)
    return AutoConfig.for_model(EXPORT_TARGETS[kind], **data)


def export(model: nn.Module, layout: HybridLayout, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write the per-layer hybrid of `model` (its current LLM weights, predictors left out) as a plain
    transformers checkpoint that loads with AutoModelForCausalLM.from_pretrained, no spkv needed."""
    from transformers import AutoModelForCausalLM

    base = getattr(model, "get_base_model", lambda: model)()
    config = export_config(base.config, layout)
    target = AutoModelForCausalLM.from_config(config).to(next(base.parameters()).dtype)
    state = {k: v for k, v in base.state_dict().items() if PREDICTOR_KEY not in k}
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"The export target does not hold the weights exactly (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if config.tie_word_embeddings:
        target.tie_weights()
    def fill(folder: Path) -> None:
        target.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "spkv_hybrid_layout.json").write_text(layout.to_json())

    return atomic_write_dir(path, fill)

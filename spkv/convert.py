"""Turn a pretrained Hugging Face causal LM into an SP-KV model.

Conversion attaches a UtilityPredictor as a submodule of each gated attention module, registers a
forward pre-hook that scores the attention input, and switches the model to the "spkv" attention
implementation. No model class is patched: everything goes through transformers' attention and
mask interfaces and ordinary PyTorch hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from spkv import attention
from spkv.cache import SPKVCache, default_cache_hook
from spkv.compat import attention_module, cache_argument, decoder_layers
from spkv.config import SPKVConfig
from spkv.lkv import TokenScorer, shares_hook
from spkv.predictor import UtilityPredictor

# Causal-LM families whose full-attention layers fit the gated rule (plain softmax attention, no
# softcapping or attention sinks), each tested on a tiny random config (tests/tiny_models.py):
# tau = 0 equals the base model, chunked prefill + decode equal the full forward. Sliding-window
# and linear-attention layers of hybrid families stay as they are.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma4_text", "qwen3_5_text", "qwen3_next",
                         "smollm3", "olmo2", "olmo3", "granite", "glm4", "cohere2", "exaone4", "phi3")


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "spkv_config", None), SPKVConfig)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"spkv does not support model_type {model_type!r} ({type(model).__name__}). "
            f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)} (causal LM classes, e.g. LlamaForCausalLM, "
            "Gemma3ForCausalLM for Gemma 3 text)."
        )
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `model.layers`: pass the *ForCausalLM model, not its backbone.")
    return layers


def full_attention_layers(hf_config: Any) -> list[int]:
    """Layers with global attention; sliding-window layers already bound their cache and stay as they are."""
    n = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if getattr(hf_config, "sliding_window", None):  # Mistral-style: every layer slides
        return []
    return list(range(n))


def predictors(model: nn.Module) -> dict[int, UtilityPredictor]:
    """layer index -> predictor of every gated layer."""
    out = {}
    for i, layer in enumerate(decoder_layers(model) or []):
        p = getattr(attention_module(layer), "spkv_predictor", None)
        if p is not None:
            out[i] = p
    return out


def _predictor_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Scores the attention input and hands the gate logits [B, T, Hkv] to the attention function."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    predictor: UtilityPredictor = module.spkv_predictor
    logits = predictor(hidden)
    if predictor.recording is not None:
        predictor.recording[module.layer_idx] = logits
    _, cache = cache_argument(kwargs)
    if isinstance(cache, SPKVCache):
        # The compressed cache takes the new tokens' gates now, before this layer's update().
        kwargs["spkv_cache_layer"] = cache.spkv_stage_gates(module.layer_idx, logits, predictor.config)
    kwargs["spkv_gate_logits"] = logits
    return args, kwargs


def _scorer_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """LKV: the compressed cache takes the layer's token scorer, which scores the new keys and
    values in the layer's update(); without a cache the attention function scores them itself."""
    _, cache = cache_argument(kwargs)
    if isinstance(cache, SPKVCache):
        kwargs["spkv_cache_layer"] = cache.spkv_stage_scorer(module.layer_idx, module.spkv_predictor, module.spkv_predictor.config)
    return args, kwargs


def convert(model: nn.Module, config: SPKVConfig | None = None) -> nn.Module:
    """Attach utility predictors and route attention through SP-KV. Returns the same model.

    With `config.lkv` set, the model becomes an LKV model instead: a token scorer and budget logits
    per gated layer (spkv.lkv), evicting under budget.

    Converting an already converted model raises: a second wrap would gate twice.
    """
    config = config or SPKVConfig()
    if is_converted(model):
        raise ValueError("This model is already converted to SP-KV; use spkv.update_config() to change its settings.")
    layers = _decoder_layers(model)
    text_config = model.config.get_text_config(decoder=True)
    full = full_attention_layers(text_config)
    gated = config.layers if config.layers is not None else full
    if not gated:
        raise ValueError(f"{type(model).__name__} has no full-attention layer to gate (all layers are sliding-window).")
    bad = [i for i in gated if i not in full]
    if bad:
        raise ValueError(
            f"SPKVConfig.layers {bad} are not full-attention layers of this model "
            f"(it has {len(layers)} layers; full-attention ones: {full})."
        )
    config = config.replace(layers=list(gated))

    attention.register()
    hkv = text_config.num_key_value_heads
    for i in gated:
        attn = attention_module(layers[i])
        ref = next(attn.parameters())
        if config.lkv is None:
            predictor, hook = UtilityPredictor(text_config.hidden_size, hkv, config), _predictor_hook
        else:
            head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            predictor, hook = TokenScorer(head_dim, hkv, config), _scorer_hook
        attn.spkv_predictor = predictor.to(device=ref.device, dtype=ref.dtype)
        attn.register_forward_pre_hook(hook, with_kwargs=True)
    model.register_forward_pre_hook(default_cache_hook, with_kwargs=True)
    if config.lkv is not None:  # after the cache hook: it looks at the cache that hook chose
        model.register_forward_pre_hook(shares_hook, with_kwargs=True)
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    model.spkv_config = config
    return model


def update_config(model: nn.Module, **changes: Any) -> SPKVConfig:
    """Change settings of a converted model (threshold, phase, anneal_alpha, ...), validated."""
    if not is_converted(model):
        raise ValueError("This model is not an SP-KV model: call spkv.convert(model) or spkv.load_adapter(model, path) first.")
    if ("lkv" in changes) and ((changes["lkv"] is None) != (model.spkv_config.lkv is None)):
        raise ValueError("SPKVConfig.lkv (SP-KV vs LKV) is fixed at conversion; convert a fresh model to change it.")
    for frozen in ("layers", "predictor_hidden", "bias_init"):
        if frozen in changes and changes[frozen] != getattr(model.spkv_config, frozen):
            raise ValueError(f"SPKVConfig.{frozen} is fixed at conversion; convert a fresh model to change it.")
    new = model.spkv_config.replace(**changes)
    model.spkv_config = new
    for p in predictors(model).values():
        p.config = new
    return new


def set_threshold(model: nn.Module, threshold: float) -> SPKVConfig:
    """Deploy-time tau: no retraining, higher tau keeps fewer pairs."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if getattr(getattr(model, "spkv_config", None), "lkv", None) is not None:
        raise ValueError("An LKV model evicts under a budget and has no threshold: use spkv.lkv.set_budget(model, r).")
    return update_config(model, threshold=float(threshold))


@contextmanager
def record_gates(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Collect each gated layer's gate logits [B, T, Hkv] during the forward passes inside the block.

    The tensors keep their autograd graph, so a training loss (e.g. a density regulariser) can use them.
    """
    record: dict[int, torch.Tensor] = {}
    preds = predictors(model).values()
    for p in preds:
        p.recording = record
    try:
        yield record
    finally:
        for p in preds:
            p.recording = None

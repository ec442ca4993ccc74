"""SP-KV adapters: the predictors plus any trained change to the LLM's own weights, in safetensors.

Layout of an adapter folder:
    adapter_config.json   format version, SPKVConfig, base model identity, what the tensors hold
    adapter.safetensors   "<param name>"            predictor weights (full state_dict names)
                          "delta.<param name>"      full weight change (trained - base)
                          "lowrank_a.<param name>"  [r, in] and "lowrank_b.<param name>" [out, r]:
                          "lowrank_b.<param name>"  weight change B @ A (LoRA or a truncated SVD)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spkv.config import SPKVConfig
from spkv.convert import convert, is_converted, update_config
from spkv.results import atomic_write_dir

FORMAT = "spkv-adapter"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PREDICTOR_KEY = ".spkv_predictor."
_ARCH_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters", "layer_types",
    "sliding_window", "tie_word_embeddings", "query_pre_attn_scalar",
)
_PROBE_SIZE = 64


def base_identity(model: nn.Module) -> dict[str, Any]:
    """Name, a hash of the architecture and weight shapes, and a small probe of the embedding values.

    The hash rejects another architecture; the probe rejects other weights of the same architecture
    (a delta applied to the wrong base would silently produce garbage).
    """
    cfg = model.config.to_dict()
    arch = {k: cfg.get(k) for k in _ARCH_KEYS}
    shapes = sorted((n, list(p.shape)) for n, p in model.state_dict().items() if PREDICTOR_KEY not in n)
    digest = hashlib.sha256(json.dumps([arch, shapes], sort_keys=True, default=str).encode()).hexdigest()
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return {"name": name, "hash": digest, "probe": _probe(model.get_input_embeddings().weight)}


def _probe(weight: torch.Tensor) -> list[float]:
    return weight.detach().flatten()[:: max(1, weight.numel() // _PROBE_SIZE)][:_PROBE_SIZE].float().tolist()


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_state: dict[str, torch.Tensor] | None = None,
    delta_rank: int | None = None,
    delta_dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a converted model's predictors and, given the base weights, its own weight changes.

    base_state: the LLM's weights before training; every parameter that differs is stored as a
        change. delta_rank: store 2-D changes as a rank-r truncated SVD (compact; exact for LoRA).
    """
    if not is_converted(model):
        raise ValueError("save_adapter needs an SP-KV model: call spkv.convert(model) first.")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())  # tied weights appear once, so a change is stored once
    for name, value in params.items():
        if PREDICTOR_KEY in name:
            tensors[name] = value.detach().float().contiguous()
    contents = {"predictors": len(tensors), "delta": [], "lowrank": []}
    if base_state is not None:
        for name, value in params.items():
            if PREDICTOR_KEY in name or name not in base_state:
                continue
            delta = value.detach().float() - base_state[name].detach().float().to(value.device)
            if not torch.any(delta != 0):
                continue
            if delta_rank is not None and delta.ndim == 2 and delta_rank < min(delta.shape):
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                tensors[f"lowrank_b.{name}"] = (u[:, :delta_rank] * s[:delta_rank]).to(delta_dtype).contiguous()
                tensors[f"lowrank_a.{name}"] = vh[:delta_rank].to(delta_dtype).contiguous()
                contents["lowrank"].append(name)
            else:
                tensors[f"delta.{name}"] = delta.to(delta_dtype).contiguous()
                contents["delta"].append(name)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spkv": model.spkv_config.to_dict(),
        "base": base_identity(model) if base_state is None else _identity_of_base(model, base_state),
        "contents": contents,
        "metadata": metadata or {},
    }
    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    return atomic_write_dir(path, fill)


def _identity_of_base(model: nn.Module, base_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Identity of the untrained base: the probe must come from its weights, not the trained ones."""
    emb_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    return {**base_identity(model), "probe": _probe(base_state[emb_name])}


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"No SP-KV adapter at {path}: {CONFIG_FILE} is missing (save one with spkv.save_adapter).")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{cfg_file} is not an spkv adapter of version <= {VERSION} "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r}).")
    return meta


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert `model` (if needed) and load an adapter saved for the same base model."""
    path = Path(path)
    meta = read_adapter_config(path)
    expected, actual = meta["base"], base_identity(model)
    if expected["hash"] != actual["hash"]:
        raise ValueError(
            f"Adapter {path} was trained for base model {expected['name']!r}, which has a different architecture "
            f"than this model ({actual['name']!r}). Load the base model the adapter was made for."
        )
    if not torch.allclose(torch.tensor(expected["probe"]), torch.tensor(actual["probe"]), rtol=2e-2, atol=2e-3):
        raise ValueError(
            f"Adapter {path} was trained for base model {expected['name']!r}: this model ({actual['name']!r}) has the "
            "same architecture but different weights. Load the base model the adapter was made for."
        )
    if getattr(model, "spkv_adapter", None) is not None:
        raise ValueError(f"An adapter ({model.spkv_adapter}) is already loaded on this model; load onto a fresh base model.")
    config = SPKVConfig.from_dict(meta["spkv"])
    if not is_converted(model):
        convert(model, config)
    elif model.spkv_config.layers != config.layers:
        raise ValueError(f"This model gates layers {model.spkv_config.layers} but the adapter gates {config.layers}.")

    tensors = load_file(str(path / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    predictor_names = [n for n in params if PREDICTOR_KEY in n]
    missing = [n for n in predictor_names if n not in tensors]
    if missing:
        raise ValueError(f"Adapter {path} lacks predictor weights {missing[:3]}{'...' if len(missing) > 3 else ''}.")
    with torch.no_grad():
        for name in predictor_names:
            params[name].copy_(tensors[name])
        for key, value in tensors.items():
            if key.startswith("delta."):
                p = params[key[len("delta."):]]
                p.add_(value.to(p))
            elif key.startswith("lowrank_b."):
                name = key[len("lowrank_b."):]
                p = params[name]
                p.add_((value.float() @ tensors[f"lowrank_a.{name}"].float()).to(p))
    model.spkv_adapter = str(path)
    # The adapter's deploy-time settings (threshold, window, phase, ...) as saved.
    update_config(model, **{k: v for k, v in config.to_dict().items() if k not in ("layers", "predictor_hidden", "bias_init")})
    return model

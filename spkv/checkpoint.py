"""Self-describing SP-KV checkpoints: one folder with the (merged) weights, the predictors and the
SP-KV settings, for users who ship a model rather than a base plus an adapter.

Layout: transformers' own files (config.json, model.safetensors, the tokenizer's files), with the
predictors' tensors among the weights and an "spkv" block in config.json. config.json's model_type
is replaced by a sentence naming spkv's loader, so a plain `AutoModelForCausalLM.from_pretrained`
stops with an error that says how to load it, instead of silently building a dense model that
ignores the predictors (transformers quotes the model type in its error). `load_checkpoint` puts
the base model_type back before building the model. Adapters (spkv.save_adapter) stay the compact
way to share SP-KV for a base model people already have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from spkv.adapter import PREDICTOR_KEY
from spkv.config import SPKVConfig
from spkv.convert import convert, is_converted
from spkv.results import atomic_write_dir

FORMAT = "spkv-model"
VERSION = 1
MODEL_TYPE = "spkv (an SP-KV checkpoint: load it with spkv.load_model(path))"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by save_pretrained."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("spkv", {}).get("format") == FORMAT


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, **kwargs: Any) -> Path:
    """Write a converted model as a standalone checkpoint (weights with any adapter merged, the
    predictors, the SP-KV settings; the tokenizer if given). Atomic: the folder appears whole.
    Extra keyword arguments go to transformers' save_pretrained (e.g. max_shard_size)."""
    if hasattr(model, "merge_and_unload"):  # a peft model from training: merge LoRA into the weights
        model = model.merge_and_unload()
    if not is_converted(model):
        raise ValueError("save_pretrained needs an SP-KV model: spkv.load_adapter(model, path) or spkv.convert(model) first.")

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text())
        config["spkv"] = {"format": FORMAT, "version": VERSION, "base_model_type": config["model_type"],
                          "config": model.spkv_config.to_dict()}
        config["model_type"] = MODEL_TYPE
        config_file.write_text(json.dumps(config, indent=2) + "\n")

    return atomic_write_dir(path, fill)

def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The converted model of a save_pretrained folder, in eval mode, with its predictors and settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    block = raw.get("spkv", {})
    if block.get("format") != FORMAT or block.get("version", 0) > VERSION:
        raise ValueError(f"{path} is not an spkv checkpoint of version <= {VERSION}: save one with spkv.save_pretrained.")
    base = {k: v for k, v in raw.items() if k != "spkv"}
    base["model_type"] = block["base_model_type"]
    config = AutoConfig.for_model(**base)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    convert(model, SPKVConfig.from_dict(block["config"]))
    params = dict(model.named_parameters())
    wanted = {n for n in params if PREDICTOR_KEY in n}
    found: set[str] = set()
    with torch.no_grad():
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in wanted & set(f.keys()):
                    params[name].copy_(f.get_tensor(name))
                    found.add(name)
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"{path} lacks predictor weights {missing[:3]}{'...' if len(missing) > 3 else ''}: the checkpoint is damaged.")
    return model.eval()

"""Helpers shared by the tests (a plain module, not a test module; tests/conftest.py holds the fixtures):
tiny random-weight models of every supported family built from configs (no downloads), their inputs,
saved checkpoint folders, and ways to drive and compare them."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from spkv.convert import predictors

VOCAB = 97
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# Families added later, tested in tests/test_families.py (fewer tests each, to keep the suite short):
# model_type -> config overrides; hybrid ones with 3 sliding / linear layers and 1 full layer.
_HYBRID = {"num_hidden_layers": 4, "sliding_window": 8, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
_LINEAR = {"num_hidden_layers": 4, "head_dim": 8, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
           "linear_num_value_heads": 2, "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
MORE_FAMILIES = {
    "gemma4_text": {**_HYBRID, "head_dim": 16},
    "qwen3_5_text": _LINEAR,
    "qwen3_next": {**_LINEAR, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 16},
    "smollm3": {"num_hidden_layers": 4},
    "olmo2": {},
    "olmo3": _HYBRID,
    "granite": {},
    "glm4": {"head_dim": 8},
    "cohere2": _HYBRID,
    "exaone4": _HYBRID,
    "phi3": {},
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A random model; GQA everywhere (4 query / 2 KV heads); Gemma 3 with 3 sliding + 1 full layer."""
    torch.manual_seed(seed)
    kw = {**_COMMON, **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **kw))
    elif family == "gemma3":
        kw.update(num_hidden_layers=overrides.get("num_hidden_layers", 4), head_dim=16)
        kw.setdefault("sliding_window", 8)
        kw.setdefault("layer_types", ["sliding_attention"] * (kw["num_hidden_layers"] - 1) + ["full_attention"])
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    elif family in MORE_FAMILIES:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**kw, **MORE_FAMILIES[family], **overrides}))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def batch(seed: int = 0, batch_size: int = 2, length: int = 40, left_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask; row 1 gets `left_pad` padding tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :left_pad] = 0
        mask[1, :left_pad] = 0
    return ids, mask


def save_tiny_pretrained(path: Path, words: int = 60, seed: int = 0, family: str = "llama", **config) -> Path:
    """A loadable checkpoint folder: a tiny random model and a word-level tokenizer ("w0" ... "wN")."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    if family != "llama":
        model = tiny_model(family, seed, vocab_size=len(vocab), eos_token_id=1, bos_token_id=None, max_position_embeddings=512, **config)
        model.save_pretrained(path)
        return path
    kw = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, eos_token_id=1, max_position_embeddings=512)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**kw, **config})).save_pretrained(path)
    return path


def logits(model, ids, mask, use_cache=False):
    """use_cache=False: the full-sequence (training) path; True: the compressed cache in one prefill."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits


def assert_close_on_real_tokens(a, b, mask, tol=1e-5):
    real = mask.bool()
    diff = (a - b).abs()[real].max().item()
    assert diff <= tol, f"max |diff| on real tokens = {diff:.3g} > {tol}"


def randomize_gates(model, seed=0, spread=3.0):
    """Predictor outputs spread around u = 0.5 so a threshold of 0.5 keeps about half the pairs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in predictors(model).values():
            p.fc2.weight.copy_(torch.randn(p.fc2.weight.shape, generator=g) * spread)
            p.fc2.bias.zero_()

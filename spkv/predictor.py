"""The utility predictor: a tiny per-layer MLP that scores each key-value pair once, when written."""

from __future__ import annotations

import torch
from torch import nn

from spkv.config import SPKVConfig


class UtilityPredictor(nn.Module):
    """Two-layer SiLU MLP from the attention input (after the input norm) to one logit per KV head.

    The input is a documented choice: method.md leaves the exact input open, and the normed hidden
    state is what the layer's k/v projections see, so it carries everything the pair will hold.
    The output bias starts at `bias_init` (+5) so every gate starts open and the converted model
    begins as the pretrained one.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, config: SPKVConfig) -> None:
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.fc1 = nn.Linear(hidden_size, config.predictor_hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(config.predictor_hidden, num_kv_heads)
        with torch.no_grad():
            self.fc2.bias.fill_(config.bias_init)
        # Shared with every other predictor of the model; swapped by spkv.update_config.
        self.config = config
        # Set by spkv.record_gates: where the hook stores this layer's gate logits.
        self.recording: dict[int, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> gate logits [batch, seq, kv_heads]; u = sigmoid(logit)."""
        return self.fc2(self.act(self.fc1(hidden_states)))

"""Next-token cross-entropy and distillation KL without the whole [T, vocab] logits in memory.

With a large vocabulary the logits are the largest tensors of a training step: Gemma3's 262k tokens
at 4k positions make one fp32 copy 4.3 GB, and the loss keeps several (the student's logits and
log-softmax, the teacher's log-probabilities). Here the model computes logits for its last position
only; its final hidden states are caught at the decoder's output, and the LM head, the
cross-entropy and the KL run over `chunk` positions at a time under activation checkpointing, so
one chunk's logits live at a time in forward and in backward. The sums equal the whole-sequence
loss (HF's mean next-token CE; the KL as `F.kl_div(..., reduction="batchmean") / T`), at the cost
of the head's matmul recomputed in backward.

The last position's logits, which the model computed itself, check on every call that the head is
reproduced exactly (Gemma's logit soft-capping is; a family with another head raises)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


@contextmanager
def final_hidden(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Catches the decoder's output ([B, T, H], after the final norm) while a *ForCausalLM runs."""
    caught: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def logits_head(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [B, t, H] -> logits [B, t, V], as the model's forward computes them."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        return out if cap is None else torch.tanh(out / cap) * cap

    return logits


def _run(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [B, T, H], the model's own last-position logits [B, 1, V])."""
    with final_hidden(model) as caught:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    if len(caught) != 1:
        raise RuntimeError(f"Expected one decoder output from {type(model).__name__}, caught {len(caught)}.")
    return caught[0], out.logits


def chunked_loss(model: torch.nn.Module, core: torch.nn.Module, input_ids: torch.Tensor, chunk: int,
                 teacher: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean next-token CE, KL(student || teacher) per position or None). `model` is what forward
    is called on (it may be wrapped by DDP or peft), `core` the *ForCausalLM inside it."""
    hidden, last = _run(model, input_ids)
    head = logits_head(core)
    with torch.no_grad():
        same = torch.allclose(head(hidden[:, -1:]).float(), last.float(), rtol=1e-3, atol=1e-3)
    if not same:
        raise ValueError(f"--loss-chunk cannot reproduce {type(core).__name__}'s logits from its hidden states "
                         "(its head does more than the output embedding and Gemma's soft-capping): train without --loss-chunk.")
    target_hidden, teacher_head = None, None
    if teacher is not None:
        with torch.no_grad():
            target_hidden, _ = _run(teacher, input_ids)
        teacher_head = logits_head(teacher)
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE)], dim=1)  # the last predicts nothing

    def terms(h: torch.Tensor, y: torch.Tensor, th: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        if th is None:
            return ce, ce.new_zeros(())
        with torch.no_grad():
            target = F.log_softmax(teacher_head(th).float(), dim=-1)
        return ce, F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="sum")

    ce_sum, kl_sum = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, input_ids.shape[1], chunk):
        part = slice(start, start + chunk)
        th = None if target_hidden is None else target_hidden[:, part]
        ce, kl = checkpoint(terms, hidden[:, part], labels[:, part], th, use_reentrant=False)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    batch, length = input_ids.shape
    ce = ce_sum / (batch * (length - 1))
    return ce, (kl_sum / (batch * length) if teacher is not None else None)

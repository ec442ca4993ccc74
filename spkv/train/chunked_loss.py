"""Next-token cross-entropy and distillation KL without the whole [T, vocab] logits in memory.

With a large vocabulary the logits are the largest tensors of a training step: Gemma3's 262k tokens
at 4k positions make one fp32 copy 4.3 GB, and the loss keeps several (the student's logits and
log-softmax, the teacher's log-probabilities). Here the model computes logits for its last position
only; its final hidden states are caught at the decoder's output, and the LM head, the
cross-entropy and the KL run over `chunk` positions at a time, so one chunk's logits live at a time.

The gradient is computed in the forward pass, chunk by chunk (the loss's gradient in the logits is
closed-form: softmax minus the one-hot label for the CE, student minus teacher probabilities for the
KL), and only its product with the head, [B, T, H], waits for backward. Recomputing each chunk in
backward instead (activation checkpointing) ran the student's and the teacher's head twice: three
head matmuls per chunk here against five. The sums equal
the whole-sequence loss (HF's mean next-token CE; the KL as `F.kl_div(..., reduction="batchmean") / T`).

The last position's logits, which the model computed itself, check on every call that the head is
reproduced exactly (Gemma's logit soft-capping is; a family with another head raises)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE = -100


@contextmanager
def final_hidden(core: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Catches the decoder's output ([B, T, H], after the final norm) while the *ForCausalLM `core`
    runs (called directly or through a wrapper: DDP and peft do not all expose `get_decoder`)."""
    caught: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output) -> None:
        caught.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = core.get_decoder().register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def output_head(model: torch.nn.Module) -> tuple[torch.Tensor, float | None]:
    """(the LM head's weight [V, H], Gemma's logit soft-cap or None): logits = cap * tanh(h W^T / cap)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(f"--loss-chunk needs a bias-free linear LM head; {type(model).__name__}'s is {type(head).__name__}: "
                         "train without --loss-chunk.")
    return head.weight, getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    """hidden [..., H] -> logits [..., V] in fp32, computed (soft-cap included) in the dtype the
    model's forward computes them in (bf16 under autocast), so they equal its own."""
    logits = F.linear(hidden, weight)
    return (logits if cap is None else torch.tanh(logits / cap) * cap).float()


def _run(model: torch.nn.Module, core: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [B, T, H], the model's own last-position logits [B, 1, V])."""
    with final_hidden(core) as caught:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    if len(caught) != 1:
        raise RuntimeError(f"Expected one decoder output from {type(model).__name__}, caught {len(caught)}.")
    return caught[0], out.logits


class _HeadLoss(torch.autograd.Function):
    """ce_scale * CE sum + kl_scale * KL sum over `chunk` positions at a time, its gradient in the
    hidden states (and the head's weight, when it trains) computed on the way."""

    @staticmethod
    def forward(ctx, hidden, weight, cap, labels, teacher_hidden, teacher_head, chunk, ce_scale, kl_scale):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        ce_sum, kl_sum = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[1], chunk):
            part = slice(start, start + chunk)
            h, y = hidden[:, part], labels[:, part]
            logits = head_logits(h, weight, cap)  # [B, t, V]
            log_q = F.log_softmax(logits, dim=-1)
            valid = y != IGNORE
            label_log_q = log_q.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, t]
            ce_sum -= label_log_q[valid].sum()
            # d(CE)/d(logits) = q - onehot(label) on labelled rows; d(KL)/d(logits) = q - p on every row
            grad = log_q.exp() * (ce_scale * valid.unsqueeze(-1) + (kl_scale if teacher_hidden is not None else 0.0))
            grad.scatter_add_(-1, y.clamp(min=0).unsqueeze(-1), (-ce_scale * valid).unsqueeze(-1).to(grad.dtype))
            cap_slope = None if cap is None else 1 - (logits / cap) ** 2  # logits = cap * tanh(u / cap)
            del logits
            if teacher_hidden is not None:
                log_p = F.log_softmax(head_logits(teacher_hidden[:, part], *teacher_head), dim=-1)
                p = log_p.exp()
                kl_sum += (p * (log_p - log_q)).sum()
                grad -= kl_scale * p
                del log_p, p
            del log_q
            if cap_slope is not None:
                grad *= cap_slope
                del cap_slope
            grad_hidden[:, part] = torch.matmul(grad, weight).to(hidden.dtype)
            if grad_weight is not None:  # in place, in fp32: no [V, H] temporaries
                with torch.autocast(hidden.device.type, enabled=False):
                    grad_weight.addmm_(grad.flatten(0, 1).transpose(0, 1), h.flatten(0, 1).float())
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return ce_scale * ce_sum + kl_scale * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # the graph (and ctx) may outlive backward: free [V, H] now
        return (grad_hidden.mul_(grad_loss), None if grad_weight is None else grad_weight.mul_(grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None, None, None)


def chunked_loss(model: torch.nn.Module, core: torch.nn.Module, input_ids: torch.Tensor, chunk: int,
                 teacher: torch.nn.Module | None = None, kl_weight: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CE + kl_weight * KL, differentiable; mean next-token CE; KL(teacher || student) per position or
    None), the last two detached. `model` is what forward is called on (it may be wrapped by DDP or
    peft), `core` the *ForCausalLM inside it."""
    hidden, last = _run(model, core, input_ids)
    weight, cap = output_head(core)
    with torch.no_grad():
        same = torch.allclose(head_logits(hidden[:, -1:], weight, cap), last.float(), rtol=1e-3, atol=1e-3)
    if not same:
        raise ValueError(f"--loss-chunk cannot reproduce {type(core).__name__}'s logits from its hidden states "
                         "(its head does more than the output embedding and Gemma's soft-capping): train without --loss-chunk.")
    target_hidden, teacher_head = None, None
    if teacher is not None:
        with torch.no_grad():
            target_hidden, _ = _run(teacher, teacher, input_ids)
        teacher_head = output_head(teacher)
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE)], dim=1)  # the last predicts nothing
    batch, length = input_ids.shape
    ce_scale, kl_scale = 1.0 / (batch * (length - 1)), kl_weight / (batch * length)
    loss, ce_sum, kl_sum = _HeadLoss.apply(hidden, weight, cap, labels, target_hidden, teacher_head, chunk, ce_scale, kl_scale)
    return loss, ce_sum * ce_scale, (kl_sum / (batch * length) if teacher is not None else None)

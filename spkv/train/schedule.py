"""The training schedule: learning rate, the soft -> anneal -> hard phases, the density regulariser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spkv.train.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio over the whole run."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


HARDEN_ALPHA = 0.999  # where hardening stops: a dropped pair's weight is 0.001 x its soft mask (-6.9 on its logit)


def soft_end(cfg: TrainConfig) -> int:
    """First step of the hard part: the predictors train before it and are frozen from it on."""
    return round(cfg.total_steps * (1 - cfg.hard_fraction))


def phase_at(cfg: TrainConfig, step: int) -> tuple[str, float]:
    """(phase, anneal_alpha) for an optimizer step.

    Soft, then (harden_fraction > 0) the last part of the soft phase mixes the hard mask into the soft
    one, alpha rising linearly to HARDEN_ALPHA while the predictors still train, then the hard part
    (predictors frozen), annealed over anneal_steps unless hardening already took alpha near 1."""
    hard_start = soft_end(cfg)
    harden = round(hard_start * cfg.harden_fraction)
    if step < hard_start - harden:
        return "soft", 0.0
    if step < hard_start:
        return "anneal", HARDEN_ALPHA * (step - (hard_start - harden) + 1) / harden
    if harden:
        return "hard", 1.0
    anneal = max(1, min(cfg.anneal_steps, cfg.total_steps - hard_start))
    alpha = min(1.0, (step - hard_start + 1) / anneal)
    return ("hard", 1.0) if alpha >= 1.0 else ("anneal", alpha)


def density_penalty(cfg: TrainConfig, soft_density: torch.Tensor, step: int) -> torch.Tensor:
    """The regulariser. One-sided, it goes quiet once the density is under the target, and the
    predictor's momentum then leaves it well below (reg35: 0.35 asked, ~0.22 reached); two-sided, it
    also pulls the density back up, so the run ends near the density asked for (both35: 38.5% at
    tau 0.5 for 0.35), though at a worse quality for that density (results/train/README.md)."""
    gap = soft_density - density_target_at(cfg, step)
    return cfg.density_weight * (gap.abs() if cfg.density_two_sided else F.relu(gap))


def density_target_at(cfg: TrainConfig, step: int) -> float:
    """The regulariser's target at a step. A ramp was meant to stop the predictor's momentum carrying
    the density far below a constant target; in the ramp35 run it did not (results/train/README.md)."""
    if not cfg.density_ramp_steps:
        return cfg.density_target
    return 1.0 - (1.0 - cfg.density_target) * min(1.0, (step + 1) / cfg.density_ramp_steps)


def temperature_at(cfg: TrainConfig, step: int) -> float:
    """LKV's soft top-k temperature: geometric from temperature_start to temperature_end over the
    soft phase, so the mask the scorer learns through ends close to the hard top-k."""
    soft_steps = max(1, soft_end(cfg))
    progress = min(1.0, step / max(1, soft_steps - 1))
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** progress

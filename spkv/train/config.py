"""Training settings: one dataclass, whose fields (with their help) are also `spkv train`'s flags."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

TRAIN_LLM = ("all", "lora", "none")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _opt(default: Any, help: str) -> Any:
    """A config field with the help text `spkv train --help` shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@functools.cache
def bf16_is_fast() -> bool:
    """Whether bf16 autocast pays here. A CPU without native bf16 (AVX2 only) emulates it: a bf16
    matmul took 58x (256x256) to 350x (2048x2048) as long as fp32 on a 2-core EPYC, so training there
    must stay in fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()

    def seconds(x: torch.Tensor) -> float:  # the fastest of a few: a busy machine only slows some
        x @ x  # first call: kernel selection
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no waiting on a descheduled peer when the machine is busy
    try:
        a = torch.randn(256, 256)
        return seconds(a.bfloat16()) <= 3 * seconds(a)
    finally:
        torch.set_num_threads(threads)


@dataclass
class TrainConfig:
    model: str = _opt("smollm2-135m", "alias (smollm2-135m, gemma3-270m), Hugging Face id or local path")
    data: list[str] = _opt(["default"], "'default' (spkv data's train split), text files, folders or HF dataset names")
    out: str = _opt("runs/spkv", "run folder: checkpoint.pt, log.jsonl, train_config.json, adapter/")
    control: bool = _opt(False, "the dense control: the same recipe with no gates")
    method: str = _opt("spkv", "spkv (write gates, admitted by tau) | lkv (learned head budgets + token scorer, evicting under budget)")
    hybrid_layout: str | None = _opt(None, "a layout JSON of spkv hybrid design: train that fixed hybrid with the control's recipe "
                                           "(global units keep every pair, local ones the window; no gates learned)")
    train_llm: str = _opt("lora", "what of the LLM trains besides the predictors: all | lora | none")
    lora_rank: int = _opt(16, "LoRA rank (train_llm=lora)")
    seq_len: int = _opt(2048, "tokens per packed training sequence")
    batch_size: int = _opt(4, "sequences per optimizer step, over all processes")
    max_tokens: int = _opt(1_000_000, "training budget in tokens (sets the number of steps)")
    lr: float = _opt(2e-4, "the LLM's (LoRA or full) peak learning rate")
    predictor_lr_mult: float = _opt(5.0, "predictor LR = lr x this (paper: 5)")
    predictor_weight_decay: float = _opt(0.1, "AdamW weight decay on the predictors")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LLM's trained weights")
    warmup_steps: int = _opt(10, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = _opt(0.1, "the cosine schedule ends at lr x this")
    hard_fraction: float = _opt(0.25, "last part of the schedule: predictor frozen, gate annealed to hard")
    harden_fraction: float = _opt(0.0, "last part of the soft phase in which the hard mask is mixed into the soft one "
                                        "(alpha 0 -> 0.999) while the predictors still train, so they learn under the mask "
                                        "they deploy with; needed where nothing adapts in a hard phase (a frozen LLM)")
    anneal_steps: int = _opt(200, "steps of the soft-to-hard anneal (capped at the hard part's length)")
    window: int = _opt(128, "local window: recent pairs always kept")
    sinks: int = _opt(0, "first tokens every gate keeps (attention sinks), in training and in the adapter it deploys with; "
                         "SP-KV learns its own (0), a frozen LLM cannot")
    threshold: float = _opt(0.5, "tau the adapter deploys with (changeable later with set_threshold)")
    predictor_hidden: int = _opt(64, "hidden units of each layer's utility predictor")
    density_target: float | None = _opt(None, "optional regulariser's target soft density in (0, 1): penalised above it, and below it "
                                              "too with --density-two-sided (needs --density-weight)")
    density_two_sided: bool = _opt(False, "penalise the soft density's distance from --density-target on both sides (default: only above it)")
    density_weight: float = _opt(0.0, "weight of the density regulariser")
    density_ramp_steps: int = _opt(0, "ramp the regulariser's target linearly from 1 down to --density-target over "
                                      "this many steps (0: constant target)")
    distill_weight: float = _opt(0.0, "optional KL to the frozen original model")
    budget: float | None = _opt(None, "lkv: r, the fraction of out-of-window pairs the model keeps, in (0, 1] (default 0.25)")
    uniform_budgets: bool = _opt(False, "lkv: every head the share r (the ablation) instead of learned shares")
    temperature_start: float | None = _opt(None, "lkv: soft top-k temperature at the start (default 1.0)")
    temperature_end: float | None = _opt(None, "lkv: temperature at the end of the soft phase, reached geometrically (default 0.05)")
    exit_every: int | None = _opt(None, "lkv: heads are cut back to their budget every this many window exits (default 32)")
    budget_lr: float | None = _opt(None, "lkv: learning rate of the budget logits (default 0.05: a share moves from r to "
                                         "near 0 or 1 within a short run)")
    bf16: bool | None = _opt(None, "bf16 autocast; default: on where this hardware runs bf16 fast (a GPU with "
                                   "bf16, a CPU with native bf16), else fp32")
    synthetic_fraction: float = _opt(0.0, "share of training sequences turned into long-range tasks (facts hidden in the text, "
                                          "asked at the end; spkv.data.synthetic), in [0, 1)")
    activation_checkpointing: bool = _opt(False, "recompute each layer's activations in backward: much less memory for long "
                                                 "--seq-len, at the cost of a second forward per layer")
    loss_chunk: int = _opt(0, "compute the LM head, cross-entropy and distillation KL over this many positions at a "
                              "time, their gradient taken on the way (0: the whole sequence at once): memory for a large "
                              "vocabulary at long --seq-len (Gemma3's logits are 4.3 GB per copy at 4k)")
    seed: int = _opt(0, "data order and initialisation")
    checkpoint_every: int = _opt(25, "steps between atomic checkpoints")
    delta_rank: int | None = _opt(None, "train_llm=all: store weight changes as rank-r SVD (lossy) in the adapter")

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = bf16_is_fast()
        if self.train_llm not in TRAIN_LLM:
            raise ValueError(f"TrainConfig.train_llm must be one of {TRAIN_LLM}, got {self.train_llm!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"TrainConfig.loss_chunk must be >= 0 (0: the whole sequence at once), got {self.loss_chunk}")
        if not 0.0 <= self.hard_fraction < 1.0:
            raise ValueError(f"TrainConfig.hard_fraction must be in [0, 1), got {self.hard_fraction}")
        if self.sinks < 0:
            raise ValueError(f"TrainConfig.sinks must be >= 0, got {self.sinks}")
        if not 0.0 <= self.harden_fraction < 1.0:
            raise ValueError(f"TrainConfig.harden_fraction must be in [0, 1) (a share of the soft phase), got {self.harden_fraction}")
        if self.batch_size < 1 or self.seq_len < 2 or self.max_tokens < self.batch_size * self.seq_len:
            raise ValueError("TrainConfig needs batch_size >= 1, seq_len >= 2 and max_tokens >= one batch of tokens")
        if (self.density_target is None) != (self.density_weight == 0.0):
            raise ValueError("Set both TrainConfig.density_target and density_weight (> 0), or neither")
        if self.density_target is not None and not 0.0 < self.density_target < 1.0:
            raise ValueError(f"TrainConfig.density_target must be in (0, 1), got {self.density_target}")
        if self.density_two_sided and self.density_target is None:
            raise ValueError("TrainConfig.density_two_sided needs a density_target")
        if self.density_ramp_steps < 0 or (self.density_ramp_steps and self.density_target is None):
            raise ValueError("TrainConfig.density_ramp_steps must be >= 0 and needs a density_target")
        if not 0.0 <= self.synthetic_fraction < 1.0:
            raise ValueError(f"TrainConfig.synthetic_fraction must be in [0, 1), got {self.synthetic_fraction}")
        lkv_options = {"budget": None, "uniform_budgets": False, "temperature_start": None, "temperature_end": None, "exit_every": None,
                       "budget_lr": None}
        if self.method not in ("spkv", "lkv"):
            raise ValueError(f"TrainConfig.method must be 'spkv' or 'lkv', got {self.method!r}")
        if self.method == "spkv":
            given = [k for k, v in lkv_options.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} are LKV options: add --method lkv, or drop them.")
        else:
            self.budget = 0.25 if self.budget is None else self.budget
            self.temperature_start = 1.0 if self.temperature_start is None else self.temperature_start
            self.temperature_end = 0.05 if self.temperature_end is None else self.temperature_end
            self.exit_every = 32 if self.exit_every is None else self.exit_every
            self.budget_lr = 0.05 if self.budget_lr is None else self.budget_lr
            if not 0.0 < self.budget <= 1.0:
                raise ValueError(f"TrainConfig.budget must be in (0, 1] (the fraction of out-of-window pairs kept), got {self.budget}")
            if self.density_weight or self.control:
                raise ValueError("LKV keeps its budget by construction: no density regulariser, and no --control "
                                 "(train the dense control with --method spkv --control)")
            if self.train_llm == "none" and self.hard_fraction > 0:
                raise ValueError("LKV with a frozen LLM (--train-llm none) trains nothing in the hard phase: set --hard-fraction 0")
            if not 0 < self.temperature_end <= self.temperature_start:
                raise ValueError("TrainConfig needs 0 < temperature_end <= temperature_start")
        if self.hybrid_layout is not None and (self.control or self.method != "spkv" or self.density_weight or self.train_llm == "none"):
            raise ValueError("A hybrid trains its LLM under a fixed layout, like the control: no --control, --method lkv, "
                             "density regulariser or --train-llm none with --hybrid-layout")
        if (self.harden_fraction or self.sinks) and not self.learns_gates:
            raise ValueError("--harden-fraction and --sinks set learned gates: a control has none, and a --hybrid-layout run "
                             "takes its sinks from the layout")
        if self.control and (self.density_weight or self.train_llm == "none"):
            raise ValueError("The dense control has no gates: no density regulariser, and train_llm must not be 'none'")

    @property
    def learns_gates(self) -> bool:
        """Whether the run trains predictors (SP-KV, LKV) rather than the LLM alone (control, hybrid)."""
        return not self.control and self.hybrid_layout is None

    @property
    def total_steps(self) -> int:
        return self.max_tokens // (self.batch_size * self.seq_len)

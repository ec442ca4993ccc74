"""SP-KV training: adapt a pretrained model so it learns when to write, from the next-token loss.

Recipe (method.md): a soft phase (attention logits += log u outside the window) over the first
(1 - hard_fraction) of a cosine schedule, then the predictor is frozen and the gate is annealed to
the exact hard decision over `anneal_steps`, so the LLM adapts to the mask it will see at inference.
`control=True` runs the identical recipe with no gates: the dense control quality is compared with.
`hybrid_layout` runs it too, under a fixed hybrid layout (spkv.hybrid): the LLM learns to live with
the layout's windows, so trained hybrids compare with the control on the same tokens and data order.

Runs on one CPU, or many processes/GPUs with `accelerate launch` (DDP; see README for FSDP).
Checkpoints are atomic and `resume=True` continues with the same data order and schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from spkv.adapter import save_adapter
from spkv.config import LKVConfig, SPKVConfig
from spkv.convert import convert, predictors, record_gates, update_config
from spkv.data.corpus import default_corpus
from spkv.data.synthetic import is_synthetic, synthetic_sequence
from spkv.density import gate_density, mean_density
from spkv.lkv import scorers
from spkv.results import atomic_write, atomic_write_text
from spkv.train.chunked_loss import chunked_loss
from spkv.train.config import LORA_TARGETS, TrainConfig
from spkv.train.schedule import density_penalty, density_target_at, lr_factor, phase_at, soft_end, temperature_at

# -- data ---------------------------------------------------------------------------------------


def packed_sequences(cfg: TrainConfig, tokenizer: Any, cache_dir: Path) -> torch.Tensor:
    """All training text tokenized and packed into [N, seq_len] (cached by a hash of the inputs)."""
    from spkv.data.corpus import iter_documents, pack_sequences

    paths = [str(default_corpus() / "train.jsonl") if d == "default" else d for d in cfg.data]
    key = hashlib.sha256(json.dumps([paths, cfg.seq_len, tokenizer.name_or_path, len(tokenizer)]).encode()).hexdigest()[:16]
    cached = cache_dir / f"packed-{key}.pt"
    if cached.exists():
        return torch.load(cached)
    docs = iter_documents(paths)
    ids = (tokenizer(doc, add_special_tokens=False).input_ids for doc in tqdm(docs, desc="tokenizing", unit="doc"))
    seqs = list(pack_sequences(ids, cfg.seq_len, eos_id=tokenizer.eos_token_id))
    if not seqs:
        raise ValueError(f"No full {cfg.seq_len}-token sequence in {paths}: give more text or a shorter --seq-len")
    data = torch.tensor(seqs, dtype=torch.int32)
    atomic_write(cached, lambda tmp: torch.save(data, tmp))
    return data


def batch_indices(cfg: TrainConfig, n_sequences: int, step: int, rank: int, world: int) -> list[int]:
    """The sequences of `step` for process `rank`: a fixed seeded order, so resuming replays exactly."""
    order = np.random.default_rng(cfg.seed).permutation(n_sequences)
    return [int(order[slot % n_sequences]) for slot in batch_slots(cfg, step, rank, world)]


def batch_slots(cfg: TrainConfig, step: int, rank: int, world: int) -> list[int]:
    """Global sequence counters of `step` for process `rank` (slot s is the run's s-th sequence)."""
    return [step * cfg.batch_size + j for j in range(rank, cfg.batch_size, world)]


def training_sequence(cfg: TrainConfig, data: torch.Tensor, row: int, slot: int, tokenizer: Any) -> torch.Tensor:
    """[1, seq_len] ids of one slot: the packed text row, or (a seeded share, synthetic_fraction) the
    same row with long-range facts written into it and asked for at the end (spkv.data.synthetic)."""
    ids = data[row]
    if is_synthetic(cfg.seed, slot, cfg.synthetic_fraction):
        ids, _ = synthetic_sequence(ids, tokenizer, cfg.seed, slot)
    return ids.unsqueeze(0).long()


# -- model --------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig):
    """(model, tokenizer, base_state, teacher). The model is converted unless this is the control
    (a hybrid is converted and given its fixed layout)."""
    from spkv.models import load_model

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    teacher = None
    if cfg.distill_weight:
        teacher, _ = load_model(cfg.model)
        teacher.requires_grad_(False)
    if cfg.hybrid_layout is not None:  # the fixed layout: constant, frozen predictors in the hard phase
        from spkv.hybrid import HybridLayout, apply_layout

        layout = HybridLayout.load(cfg.hybrid_layout, model=cfg.model)
        if layout.window != cfg.window:
            raise ValueError(f"The layout {cfg.hybrid_layout} has window {layout.window}, the run --window {cfg.window}: make them equal.")
        with torch.random.fork_rng():  # the predictors' init draws nothing: LoRA starts as the control's does
            convert(model, spkv_config(cfg, phase="hard").replace(layers=layout.layers))
            apply_layout(model, layout)
    elif not cfg.control:
        convert(model, spkv_config(cfg, phase="soft"))
    model.config.use_cache = False
    if cfg.activation_checkpointing:  # recompute each layer in backward: memory for long --seq-len
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train_llm == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS))
    elif cfg.train_llm == "none":
        model.requires_grad_(False)
    for p in _predictor_params(model):
        p.requires_grad_(cfg.learns_gates)
    model.train()
    return model, tokenizer, base_state, teacher


def spkv_config(cfg: TrainConfig, phase: str) -> SPKVConfig:
    """The SP-KV (or LKV) settings a run trains and deploys with."""
    lkv = None
    if cfg.method == "lkv":
        lkv = LKVConfig(budget=cfg.budget, uniform=cfg.uniform_budgets, temperature=cfg.temperature_start, exit_every=cfg.exit_every)
    return SPKVConfig(window=cfg.window, threshold=cfg.threshold, phase=phase, predictor_hidden=cfg.predictor_hidden,
                      sinks=cfg.sinks, lkv=lkv)


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying *ForCausalLM under DDP and peft wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _predictor_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for pred in predictors(_core(model)).values() for p in pred.parameters()]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    pred = {id(p) for p in _predictor_params(model)}
    llm = [p for p in model.parameters() if p.requires_grad and id(p) not in pred]
    groups = [{"params": llm, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
    budget = [s.budget_logits for s in scorers(_core(model)).values()] if not cfg.uniform_budgets else []
    if pred:
        lr = cfg.lr * cfg.predictor_lr_mult
        rest = [p for p in _predictor_params(model) if p.requires_grad and all(p is not b for b in budget)]
        groups.append({"params": rest, "lr": lr, "weight_decay": cfg.predictor_weight_decay, "base_lr": lr, "predictor": True})
    if budget:
        groups.append({"params": budget, "lr": cfg.budget_lr, "weight_decay": 0.0, "base_lr": cfg.budget_lr, "predictor": True})
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))


# -- checkpoints ----------------------------------------------------------------------------------


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_parameters() if "spkv_predictor" in n}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in names}


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; inf for a line a kill cut short (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: TrainConfig) -> None:
    state = {
        "step": step, "config": dataclasses.asdict(cfg), "model": _trainable_state(model), "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, model, optimizer, cfg: TrainConfig) -> int:
    state = torch.load(path, weights_only=False)
    saved = TrainConfig(**state["config"])
    free = ("out", "checkpoint_every")  # may change between a run and its resume
    differs = [f.name for f in dataclasses.fields(cfg) if f.name not in free and getattr(saved, f.name) != getattr(cfg, f.name)]
    if differs:
        raise ValueError(f"Checkpoint {path} was made with different settings ({', '.join(differs)}); resume with the same ones or use a new --out.")
    missing = set(state["model"]) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"Checkpoint {path} holds parameters this model lacks: {sorted(missing)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]


# -- the loop -----------------------------------------------------------------------------------


def step_loss(cfg: TrainConfig, model, teacher, input_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch and its logged numbers (density at tau from the gates used)."""
    core, kl = _core(model), None
    with record_gates(core) if not cfg.control else nullcontext({}) as gates:
        if cfg.loss_chunk:  # loss = ce + distill_weight * kl
            loss, ce, kl = chunked_loss(model, core, input_ids, cfg.loss_chunk, teacher, cfg.distill_weight)
        else:
            out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            loss = ce = out.loss
            if teacher is not None:
                with torch.no_grad():
                    target = F.log_softmax(teacher(input_ids=input_ids, use_cache=False).logits.float(), dim=-1)
                kl = F.kl_div(F.log_softmax(out.logits.float(), dim=-1), target, log_target=True,
                              reduction="batchmean") / input_ids.shape[1]
                loss = loss + cfg.distill_weight * kl
    stats = {"ce": ce.item()}
    if cfg.method == "lkv":
        stats["temperature"] = core.spkv_config.lkv.temperature
    if gates:
        kept, counted = gate_density(gates, cfg.threshold, cfg.window)
        stats["density"] = float(mean_density(kept, counted))
        if cfg.density_weight and step < soft_end(cfg):  # while the predictors train
            soft_kept, soft_counted = gate_density(gates, cfg.threshold, cfg.window, soft=True)
            soft_density = mean_density(soft_kept, soft_counted)
            loss = loss + density_penalty(cfg, soft_density, step)
            stats["soft_density"], stats["density_target"] = float(soft_density.detach()), density_target_at(cfg, step)
    if kl is not None:
        stats["kl"] = float(kl.detach())
    return loss, stats


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None) -> Path:
    """Run (or resume) training; returns the adapter folder. max_steps stops early (for tests and
    time-boxed runs): the schedule still spans the full token budget."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accel = Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, CPU processes launched together would not form a group
        mixed_precision="bf16" if cfg.bf16 else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # predictor frozen late
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out / "checkpoint.pt", out / "log.jsonl"
    model, tokenizer, base_state, teacher = build_model(cfg)
    with accel.main_process_first():
        data = packed_sequences(cfg, tokenizer, out.parent / "packed")
    optimizer = build_optimizer(cfg, model)
    start = 0
    if resume and ckpt.exists():
        start = load_checkpoint(ckpt, model, optimizer, cfg)
        if accel.is_main_process and log_path.exists():  # steps logged after the checkpoint are run again
            atomic_write_text(log_path, "".join(line + "\n" for line in log_path.read_text().splitlines()
                                                if _logged_step(line) <= start))
    elif not resume and ckpt.exists():
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out.")
    model, optimizer = accel.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accel.device)
    if accel.is_main_process:
        # The tokens themselves, hashed: `spkv data` rebuilds the corpus from packages whose versions
        # move, so two runs (an adapter and its control) share their training tokens iff this matches.
        digest = hashlib.sha256(str(list(data.shape)).encode() + data.numpy().tobytes()).hexdigest()  # rows and tokens
        record = dataclasses.asdict(cfg) | {"packed_data_sha256": digest, "packed_sequences": len(data)}
        atomic_write_text(out / "train_config.json", json.dumps(record, indent=2))

    stop = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    desc = "spkv control" if cfg.control else "spkv hybrid" if cfg.hybrid_layout else "spkv train"
    bar = tqdm(total=cfg.total_steps, initial=start, desc=desc,
               disable=not accel.is_main_process, unit="step")
    for step in range(start, stop):
        phase, alpha = phase_at(cfg, step) if cfg.hybrid_layout is None else ("hard", 1.0)
        if cfg.learns_gates:
            changes = {"phase": phase, "anneal_alpha": alpha}
            if cfg.method == "lkv":
                changes["lkv"] = _core(model).spkv_config.lkv.replace(temperature=temperature_at(cfg, step))
            update_config(_core(model), **changes)
        for group in optimizer.param_groups:
            frozen = group.get("predictor") and step >= soft_end(cfg)  # the predictor is frozen after the soft phase
            group["lr"] = 0.0 if frozen else group["base_lr"] * lr_factor(cfg, step)
        t0 = time.perf_counter()
        rows = batch_indices(cfg, len(data), step, accel.process_index, accel.num_processes)
        slots = batch_slots(cfg, step, accel.process_index, accel.num_processes)
        logs: list[dict[str, float]] = []
        for i, (row, slot) in enumerate(zip(rows, slots)):
            input_ids = training_sequence(cfg, data, row, slot, tokenizer).to(accel.device)
            sync = i == len(rows) - 1
            with accel.no_sync(model) if not sync else nullcontext(), accel.autocast():
                loss, stats = step_loss(cfg, model, teacher, input_ids, step)
                accel.backward(loss / len(rows))
            logs.append(stats)
        accel.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        record = {k: float(np.mean([s[k] for s in logs])) for k in logs[0]}
        record = {"step": step + 1, "phase": phase, "alpha": alpha, "lr": optimizer.param_groups[0]["lr"],
                  "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
                  "seconds": seconds, **record}
        if accel.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("ce", "density", "tokens_per_s") if k in record}, refresh=False)
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop:
                save_checkpoint(ckpt, accel.unwrap_model(model), optimizer, step + 1, cfg)
    bar.close()
    accel.wait_for_everyone()
    adapter = out / "adapter"
    if accel.is_main_process and stop == cfg.total_steps:
        export_adapter(cfg, accel.unwrap_model(model), base_state, adapter)
    return adapter


def export_adapter(cfg: TrainConfig, model: torch.nn.Module, base_state: dict[str, torch.Tensor], path: Path) -> Path:
    """The deployable adapter: predictors + LLM weight changes (LoRA merged and stored exactly as rank-r factors)."""
    rank = cfg.delta_rank
    if cfg.train_llm == "lora":
        model, rank = model.merge_and_unload(), cfg.lora_rank
    if cfg.control:  # the control has no trained gates: it deploys dense (tau = 0 keeps every pair)
        convert(model, SPKVConfig(window=cfg.window, threshold=0.0, predictor_hidden=cfg.predictor_hidden))
    changes = {"phase": "hard", "anneal_alpha": 0.0}
    if cfg.method == "lkv":
        changes["lkv"] = model.spkv_config.lkv.replace(temperature=cfg.temperature_end)
    update_config(model, **changes)
    meta = {"train_config": dataclasses.asdict(cfg), "tokens": cfg.total_steps * cfg.batch_size * cfg.seq_len, "steps": cfg.total_steps}
    if cfg.hybrid_layout is not None:  # the layout itself, so the adapter does not depend on the file staying as it was
        meta["hybrid_layout"] = json.loads(model.spkv_hybrid.to_json())
    return save_adapter(model, path, base_state=base_state, delta_rank=rank, delta_dtype=torch.bfloat16 if rank else torch.float32, metadata=meta)

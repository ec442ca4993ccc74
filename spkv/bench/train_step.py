"""`spkv bench train`: the step time of SP-KV (and LKV) training against plain fine-tuning of the same model.

All run the same recipe (spkv.train) on the same random batch; only the gates differ (the plain run
is the dense control). LKV runs its documented recipe: self-distillation (one more forward, of the
full-cache model) and soft top-k. Steps alternate between the runs so load on a shared machine hits
each alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spkv.results import atomic_write_text, write_json
from spkv.train.config import TrainConfig
from spkv.train.loop import build_model, build_optimizer, step_loss


def _one_step(cfg: TrainConfig, model: torch.nn.Module, teacher: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
              ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        loss, _ = step_loss(cfg, model, teacher, ids, step=0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


PLAIN, SPKV, LKV = "plain fine-tuning", "SP-KV (soft phase)", "LKV (soft phase, LLM frozen, self-distillation)"
RUNS = {  # name -> TrainConfig fields beyond the shared ones (LKV: scripts/train_lkv.sh's lkv-frozen recipe)
    PLAIN: {"control": True},
    SPKV: {},
    LKV: {"method": "lkv", "budget": 0.3, "hard_fraction": 0.0, "distill_weight": 1.0, "train_llm": "none"},
}


def run_train_bench(model: str = "smollm2-135m", seq_len: int = 2048, steps: int = 5, warmup: int = 1,
                    train_llm: str = "lora", bf16: bool | None = None, lkv: bool = False) -> dict[str, Any]:
    """Median step seconds of each run on one random batch; `train_llm` for plain and SP-KV (LKV's
    recipe freezes the LLM and adds the teacher's forward)."""
    runs = {}
    for name, fields in RUNS.items():
        if name == LKV and not lkv:
            continue
        cfg = TrainConfig(model=model, seq_len=seq_len, batch_size=1, max_tokens=seq_len * (steps + warmup),
                          bf16=bf16, **{"train_llm": train_llm, **fields})
        net, _, _, teacher = build_model(cfg)
        runs[name] = (cfg, net, teacher, build_optimizer(cfg, net), [])
    vocab = next(iter(runs.values()))[1].config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    for step in tqdm(range(warmup + steps), desc="bench train", unit="step"):
        for cfg, net, teacher, optimizer, times in runs.values():
            seconds = _one_step(cfg, net, teacher, optimizer, ids)
            if step >= warmup:
                times.append(seconds)
    rows = {name: {"run": name, "train_llm": cfg.train_llm, "distill": teacher is not None,
                   "median_step_s": statistics.median(t), "step_s": t, "tokens_per_s": seq_len / statistics.median(t)}
            for name, (cfg, _, teacher, _, t) in runs.items()}
    over = {f"{key}_over_plain": rows[name]["median_step_s"] / rows[PLAIN]["median_step_s"]
            for key, name in (("spkv", SPKV), ("lkv", LKV)) if name in rows}
    return {"benchmark": "train", "model": model, "seq_len": seq_len, "train_llm": train_llm, "bf16": cfg.bf16,
            "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(), "rows": list(rows.values()), **over}


def write_train_bench(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    write_json(out / "train.json", result)
    lines = [f"Training step, {result['model']}, {result['seq_len']} tokens, train_llm={result['train_llm']}, "
             f"bf16={result['bf16']}, {result['threads']} threads, median of {result['steps']} steps (alternating runs)", "",
             "| run | LLM trained | median step (s) | tokens/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r.get('train_llm', result['train_llm'])} | {r['median_step_s']:.2f} | {r['tokens_per_s']:.1f} |"
              for r in result["rows"]]
    lines += ["", f"SP-KV / plain step time: **{result['spkv_over_plain']:.2f}x** (target <= 1.3x)"]
    if "lkv_over_plain" in result:
        lines.append(f"LKV / plain step time: **{result['lkv_over_plain']:.2f}x**")
    return atomic_write_text(out / "train.md", "\n".join(lines) + "\n")

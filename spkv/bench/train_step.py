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


def _one_step(cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        loss, _ = step_loss(cfg, model, None, ids, step=0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


RUNS = {  # name -> TrainConfig fields beyond the shared ones
    "plain fine-tuning": {"control": True},
    "SP-KV (soft phase)": {},
    "LKV (soft phase, self-distillation)": {"method": "lkv", "budget": 0.3, "hard_fraction": 0.0, "distill_weight": 1.0},
}


def run_train_bench(model: str = "smollm2-135m", seq_len: int = 2048, steps: int = 5, warmup: int = 1,
                    train_llm: str = "lora", bf16: bool | None = None, lkv: bool = False) -> dict[str, Any]:
    runs = {}
    for name, fields in RUNS.items():
        if "LKV" in name and not lkv:
            continue
        cfg = TrainConfig(model=model, seq_len=seq_len, batch_size=1, max_tokens=seq_len * (steps + warmup),
                          train_llm=train_llm, bf16=bf16, **fields)
        net, _, _, _ = build_model(cfg)
        runs[name] = (cfg, net, build_optimizer(cfg, net), [])
    vocab = next(iter(runs.values()))[1].config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    for step in tqdm(range(warmup + steps), desc="bench train", unit="step"):
        for cfg, net, optimizer, times in runs.values():
            seconds = _one_step(cfg, net, optimizer, ids)
            if step >= warmup:
                times.append(seconds)
    rows = [{"run": name, "median_step_s": statistics.median(t), "step_s": t, "tokens_per_s": seq_len / statistics.median(t)}
            for name, (_, _, _, t) in runs.items()]
    return {"benchmark": "train", "model": model, "seq_len": seq_len, "train_llm": train_llm, "bf16": cfg.bf16,
            "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(), "rows": rows,
            "spkv_over_plain": rows[1]["median_step_s"] / rows[0]["median_step_s"],
            **({"lkv_over_plain": rows[2]["median_step_s"] / rows[0]["median_step_s"]} if lkv else {})}


def write_train_bench(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    write_json(out / "train.json", result)
    lines = [f"Training step, {result['model']}, {result['seq_len']} tokens, train_llm={result['train_llm']}, "
             f"bf16={result['bf16']}, {result['threads']} threads, median of {result['steps']} steps (alternating runs)", "",
             "| run | median step (s) | tokens/s |", "| --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['median_step_s']:.2f} | {r['tokens_per_s']:.1f} |" for r in result["rows"]]
    lines += ["", f"SP-KV / plain step time: **{result['spkv_over_plain']:.2f}x** (target <= 1.3x)"]
    if "lkv_over_plain" in result:
        lines.append(f"LKV / plain step time: **{result['lkv_over_plain']:.2f}x**")
    return atomic_write_text(out / "train.md", "\n".join(lines) + "\n")

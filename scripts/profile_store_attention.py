"""Why SP-KV decode misses its speed goal: one (sequence, KV head) store attention at 1 and 2 threads,
against batched sdpa over all heads. Run: .venv/bin/python scripts/profile_store_attention.py
Writes results/bench/store_attention_profile.{json,md}."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spkv.results import atomic_write_text, write_json  # noqa: E402

PAIRS, DIM, GROUP, BATCH, KV_HEADS = 8192, 64, 3, 8, 3


def median_s(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    k, v, q = torch.randn(PAIRS, DIM), torch.randn(PAIRS, DIM), torch.randn(GROUP, 1, DIM)
    one_head = lambda: torch.softmax((q @ k.T) * DIM**-0.5, dim=-1) @ v  # what SPKVLayer.attend does per (b, h)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = median_s(one_head)
        rows.append({"what": f"one (sequence, head), {threads} thread(s)", "ms": 1e3 * t, "gb_per_s": 2 * PAIRS * DIM * 4 / t / 1e9})
    kb, vb = torch.randn(BATCH, KV_HEADS, PAIRS, DIM), torch.randn(BATCH, KV_HEADS, PAIRS, DIM)
    qb = torch.randn(BATCH, KV_HEADS * GROUP, 1, DIM)
    t = median_s(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True), 5)
    rows.append({"what": f"batched sdpa, {BATCH}x{KV_HEADS} heads, 2 threads, per head", "ms": 1e3 * t / (BATCH * KV_HEADS),
                 "gb_per_s": 2 * kb.numel() * 4 / t / 1e9})
    out = ROOT / "results" / "bench"
    write_json(out / "store_attention_profile.json", {"pairs": PAIRS, "head_dim": DIM, "group": GROUP, "rows": rows})
    lines = [f"Attention of one decode query group over {PAIRS} stored pairs (head dim {DIM}, fp32)", "",
             "| what | ms | GB/s |", "| --- | --- | --- |"] + [f"| {r['what']} | {r['ms']:.3f} | {r['gb_per_s']:.1f} |" for r in rows]
    print("\n".join(lines))
    atomic_write_text(out / "store_attention_profile.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Which page layout makes the store's two decode bmms cheapest on this CPU.

A decode step over the paged store (spkv/store.py) is two batched matmuls per layer: scores = query @
keys and out = probs @ values, one small matrix per page. Each operand can sit in a page as
[page, D] or [D, page]; which one the BLAS reads fastest depends on the CPU and the library, so this
measures all four at decode's shapes (G queries per KV head, `layers` distinct pools, so the reads
come from memory and not from cache) and saves the medians. The store ships the fastest pair
(keys [D, page], values [page, D]) as measured here; rerun on a new CPU before changing it.

Run: .venv/bin/python scripts/bench_store_layout.py [--context 16384] [--batch 8] [--page 32 128]
Writes results/bench/store_layout/layout.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spkv.results import atomic_write_text, provenance, write_json  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()  # warmup
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(context: int, batch: int, page: int, density: float, layers: int, repeats: int,
            kv_heads: int = 3, group: int = 3, head_dim: int = 64) -> dict[str, float]:
    """Median ms of one decode step's key pass and value pass over `layers` pools, each layout."""
    pages = int(batch * kv_heads * context * density) // page
    as_rows = [torch.randn(pages, page, head_dim) for _ in range(layers)]  # [pages, page, D]
    as_cols = [x.transpose(1, 2).contiguous() for x in as_rows]  # [pages, D, page]
    query, probs = torch.randn(pages, group, head_dim), torch.rand(pages, group, page)
    cases = {
        "keys [page, D]": lambda: [torch.bmm(query, k.transpose(1, 2)) for k in as_rows],
        "keys [D, page]": lambda: [torch.bmm(query, k) for k in as_cols],
        "values [page, D]": lambda: [torch.bmm(probs, v) for v in as_rows],
        "values [D, page]": lambda: [torch.bmm(probs, v.transpose(1, 2)) for v in as_cols],
    }
    mib = layers * pages * page * head_dim * 4 / 2**20
    return {"pages_per_layer": pages, "mib_per_pass": round(mib, 1),
            **{name: round(median_ms(fn, repeats), 2) for name, fn in cases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--page", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=30, help="distinct pools per pass (SmolLM2-135M has 30 layers)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="results/bench/store_layout")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (saved with the numbers)")
    a = ap.parse_args()
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for page in a.page:
            row = {"threads": threads, "page": page, **measure(a.context, a.batch, page, a.density, a.layers, a.repeats)}
            print(row, flush=True)
            rows.append(row)
    prov = provenance()
    write_json(Path(a.out) / "layout.json", {"settings": vars(a), "rows": rows, "provenance": prov})
    names = ["keys [page, D]", "keys [D, page]", "values [page, D]", "values [D, page]"]
    lines = [f"# Store page layout: one decode step's bmms over {a.layers} pools ({a.context} context x batch "
             f"{a.batch}, density {a.density}, fp32)", "",
             f"command: `{prov['command']}` at commit `{prov['commit'][:12]}`; CPU: {prov['machine'].get('cpu_model')}; "
             f"load average at the end: {prov['machine'].get('load_average_1_5_15_min')}",
             *([f"note: {a.note}"] if a.note else []), "",
             "| threads | page | MiB per pass | " + " | ".join(f"{n} ms" for n in names) + " |",
             "|---" * (3 + len(names)) + "|"]
    lines += [f"| {r['threads']} | {r['page']} | {r['mib_per_pass']} | " + " | ".join(str(r[n]) for n in names) + " |"
              for r in rows]
    atomic_write_text(Path(a.out) / "layout.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

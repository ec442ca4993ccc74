"""Step-by-step decode times of SP-KV's cache, with the steps that take the batched window exits marked.

Why: the decode benchmark gives one number per row (the mean step over whole exit periods). When that
number misses the ideal proportional step, this shows whether ordinary steps or exit steps are slow.
Fills a forced-density cache (the bench's `density-P` rows: synthetic fill through the cache's own
update/eviction) and a static full cache, then times consecutive single-token steps of each.

--code DIR measures another checkout of spkv (e.g. a git worktree of an older commit) with this same
script, so two versions of the code are compared side by side; the result records DIR's commit.

Run: .venv/bin/python scripts/decode_steps.py --context 16384 --batch 8 --name decode_steps_16k
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--caches", nargs="+", default=["density-25", "window-only", "static"])
    parser.add_argument("--steps", type=int, default=48, help="timed steps per cache (3 exit periods by default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--code", default=str(ROOT), help="the spkv checkout to measure (default: this one)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "decode_steps"))
    parser.add_argument("--name", default="decode_steps")
    return parser.parse_args()


def decided(cache: Any) -> int:
    """Pairs every SP-KV layer has decided so far (changes exactly on a step that takes exits)."""
    return sum(int(layer.decided.sum()) for layer in getattr(cache, "layers", []) if hasattr(layer, "decided"))


def run_cache(pool: Any, name: str, context: int, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    from spkv.bench import common, decode
    from spkv.compat import CACHE_ARG

    spec = decode.parse_cache(name)
    model = pool.get(spec.variant)
    cache = decode.make_cache(spec, model, context + warmup + steps + 1)
    token = common.synthetic_fill(model, cache, batch, context, 1024)
    times, exits = [], []
    with torch.no_grad():
        for i in range(warmup + steps):
            before = decided(cache)
            start = time.perf_counter()
            token = model(input_ids=token, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(1e3 * elapsed)
                exits.append(decided(cache) != before)
    plain = [t for t, e in zip(times, exits) if not e]
    taken = [t for t, e in zip(times, exits) if e]
    return {"cache": name, "step_ms": times, "exit_step": exits, "mean_ms": statistics.fmean(times),
            "median_ms": statistics.median(times), "plain_step_mean_ms": statistics.fmean(plain) if plain else None,
            "exit_step_mean_ms": statistics.fmean(taken) if taken else None, "exit_steps": len(taken)}


def markdown(result: dict[str, Any]) -> str:
    p = result["provenance"]
    lines = [f"# Decode steps one by one: {result['model']} (fp32), context {result['context']} x batch {result['batch']}",
             "", f"command: `{p['command']}`; measured code: commit `{p['commit'][:12]}`; torch threads "
             f"{result['threads']}; {p['date']}", "",
             "| cache | mean step ms | median step ms | ordinary steps, mean ms | exit steps (count), mean ms |",
             "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        plain = "" if row["plain_step_mean_ms"] is None else f"{row['plain_step_mean_ms']:.1f}"
        taken = "" if row["exit_step_mean_ms"] is None else f"({row['exit_steps']}) {row['exit_step_mean_ms']:.1f}"
        lines.append(f"| {row['cache']} | {row['mean_ms']:.1f} | {row['median_ms']:.1f} | {plain} | {taken} |")
    lines += ["", "Every step in order (ms; * marks a step that took window exits):", ""]
    for row in result["rows"]:
        steps = " ".join(f"{t:.0f}{'*' if e else ''}" for t, e in zip(row["step_ms"], row["exit_step"]))
        lines.append(f"- {row['cache']}: {steps}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    from spkv.bench import common
    from spkv.results import atomic_write_text, provenance, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    pool = common.ModelPool(args.model, torch.float32, window=128, adapter=None)
    rows = []
    for name in args.caches:
        rows.append(run_cache(pool, name, args.context, args.batch, args.warmup, args.steps))
        print(f"{name}: mean {rows[-1]['mean_ms']:.1f} ms", file=sys.stderr, flush=True)
    result = {"model": args.model, "context": args.context, "batch": args.batch, "threads": torch.get_num_threads(),
              "code": str(Path(args.code).resolve()), "rows": rows, "provenance": provenance()}
    text = markdown(result)
    write_json(Path(args.out) / f"{args.name}.json", result)
    atomic_write_text(Path(args.out) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

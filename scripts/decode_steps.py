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
import resource
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
    parser.add_argument("--steps", type=int, default=48, help="timed steps per cache and round (3 exit periods by default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of --steps steps per cache, the caches taking turns (all filled first)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--code", default=str(ROOT), help="the spkv checkout to measure (default: this one)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "decode_steps"))
    parser.add_argument("--name", default="decode_steps")
    return parser.parse_args()


def decided(cache: Any) -> int:
    """Pairs every SP-KV layer has decided so far (changes exactly on a step that takes exits)."""
    return sum(int(layer.decided.sum()) for layer in getattr(cache, "layers", []) if hasattr(layer, "decided"))


def fill(pool: Any, name: str, context: int, batch: int, total_steps: int) -> dict[str, Any]:
    """A cache of the bench's `name`, synthetically filled with `context` tokens, ready to decode."""
    from spkv.bench import common, decode

    spec = decode.parse_cache(name)
    model = pool.get(spec.variant)
    cache = decode.make_cache(spec, model, context + total_steps + 1)
    token = common.synthetic_fill(model, cache, batch, context, 1024)
    return {"cache": name, "model": model, "kv": cache, "token": token, "step_ms": [], "exit_step": [], "page_faults": []}


def run_steps(state: dict[str, Any], steps: int, timed: bool) -> None:
    """`steps` consecutive decode steps of one filled cache, each timed, its exits and page faults noted."""
    import torch

    from spkv.compat import CACHE_ARG

    model, cache, token = state["model"], state["kv"], state["token"]
    with torch.no_grad():
        for _ in range(steps):
            before, faulted = decided(cache), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            token = model(input_ids=token, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - start
            if timed:
                state["step_ms"].append(1e3 * elapsed)
                state["exit_step"].append(decided(cache) != before)
                state["page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    state["token"] = token


def summary(state: dict[str, Any], rounds: int) -> dict[str, Any]:
    times, exits = state["step_ms"], state["exit_step"]
    per_round = len(times) // rounds
    plain = [t for t, e in zip(times, exits) if not e]
    taken = [t for t, e in zip(times, exits) if e]
    return {"cache": state["cache"], "step_ms": times, "exit_step": exits, "page_faults": state["page_faults"],
            "round_mean_ms": [statistics.fmean(times[r * per_round:(r + 1) * per_round]) for r in range(rounds)],
            "mean_ms": statistics.fmean(times), "median_ms": statistics.median(times),
            "plain_step_mean_ms": statistics.fmean(plain) if plain else None,
            "exit_step_mean_ms": statistics.fmean(taken) if taken else None, "exit_steps": len(taken)}


def ideal_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per density-P row: measured / ideal proportional in each round, ideal = window-only + P/100 x
    (static - window-only) from the same round (the decode benchmark's column, here drift-free)."""
    by = {r["cache"]: r for r in rows}
    if "static" not in by or "window-only" not in by:
        return []
    out = []
    for name, row in by.items():
        if not name.startswith("density-"):
            continue
        share = float(name.split("-", 1)[1]) / 100
        ratios = [m / (w + share * (st - w)) for m, w, st in
                  zip(row["round_mean_ms"], by["window-only"]["round_mean_ms"], by["static"]["round_mean_ms"])]
        speedups = [st / m for m, st in zip(row["round_mean_ms"], by["static"]["round_mean_ms"])]
        out.append({"cache": name, "measured_over_ideal": ratios, "median_measured_over_ideal": statistics.median(ratios),
                    "vs_static": speedups, "median_vs_static": statistics.median(speedups)})
    return out


def markdown(result: dict[str, Any]) -> str:
    p = result["provenance"]
    lines = [f"# Decode steps one by one: {result['model']} (fp32), context {result['context']} x batch {result['batch']}",
             "", f"command: `{p['command']}`; measured code: commit `{p['commit'][:12]}`; torch threads "
             f"{result['threads']}; {p['date']}", "",
             f"{result.get('rounds', 1)} round(s) of {result.get('steps', '?')} steps per cache after "
             f"{result.get('warmup', '?')} warmup steps; all caches filled first, then taking turns round by round.", "",
             "| cache | mean step ms | median step ms | ordinary steps, mean ms | exit steps (count), mean ms |",
             "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        plain = "" if row["plain_step_mean_ms"] is None else f"{row['plain_step_mean_ms']:.1f}"
        taken = "" if row["exit_step_mean_ms"] is None else f"({row['exit_steps']}) {row['exit_step_mean_ms']:.1f}"
        lines.append(f"| {row['cache']} | {row['mean_ms']:.1f} | {row['median_ms']:.1f} | {plain} | {taken} |")
    if result.get("ideal"):
        lines += ["", "Measured / ideal proportional (ideal = window-only + P/100 x (static - window-only)) and speed-up "
                  "over static, each from one round's means:", "",
                  "| cache | measured / ideal per round | median | vs static per round | median |", "| --- | --- | --- | --- | --- |"]
        for row in result["ideal"]:
            lines.append(f"| {row['cache']} | {' '.join(f'{x:.2f}' for x in row['measured_over_ideal'])} | "
                         f"{row['median_measured_over_ideal']:.2f} | {' '.join(f'{x:.2f}' for x in row['vs_static'])} | "
                         f"{row['median_vs_static']:.2f} |")
    lines += ["", "Every step in order (ms; * marks a step that took window exits):", ""]
    for row in result["rows"]:
        steps = " ".join(f"{t:.0f}{'*' if e else ''}" for t, e in zip(row["step_ms"], row["exit_step"]))
        lines.append(f"- {row['cache']}: {steps}")
    lines += ["", "Minor page faults of each step (the kernel mapping fresh memory: large temporaries that the "
              "allocator takes from and returns to the system every step):", ""]
    for row in result["rows"]:
        lines.append(f"- {row['cache']}: {' '.join(str(f) for f in row.get('page_faults', []))}")
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
    total = args.warmup + args.steps * args.rounds
    states = [fill(pool, name, args.context, args.batch, total) for name in args.caches]
    for state in states:
        run_steps(state, args.warmup, timed=False)
    for r in range(args.rounds):  # round-robin: host drift moves every cache's round alike
        for state in states:
            run_steps(state, args.steps, timed=True)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{st['cache']} {statistics.fmean(st['step_ms'][-args.steps:]):.0f} ms"
                                                         for st in states), file=sys.stderr, flush=True)
    rows = [summary(state, args.rounds) for state in states]
    result = {"model": args.model, "context": args.context, "batch": args.batch, "threads": torch.get_num_threads(),
              "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
              "code": str(Path(args.code).resolve()), "rows": rows, "ideal": ideal_ratios(rows), "provenance": provenance()}
    text = markdown(result)
    write_json(Path(args.out) / f"{args.name}.json", result)
    atomic_write_text(Path(args.out) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

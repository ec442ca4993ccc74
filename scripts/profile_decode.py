"""Where an SP-KV decode step spends its time: a profile of real decode steps through the cache.

Fills a forced-density SP-KV cache (bench's `density-P` rows: synthetic fill through the cache's own
update/eviction) and a static full cache for the same (context, batch), times decode steps of both in
the same process, then profiles SP-KV steps two ways: cProfile (cumulative time of the cache's Python
functions: attention, eviction, window update) and torch.profiler (self CPU time per aten op, and how
many ops a step launches). Writes results/bench/decode_profile.{json,md} (--name changes the stem).

Run: .venv/bin/python scripts/profile_decode.py [--contexts 8192 32768] [--batch 8] [--density 25]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spkv.bench import common, decode, machine  # noqa: E402
from spkv.compat import CACHE_ARG  # noqa: E402
from spkv.results import atomic_write_text, write_json  # noqa: E402

# Functions whose cumulative time cProfile reports (file suffix, function name).
FUNCTIONS = [
    ("spkv/cache_layer.py", "attend"), ("spkv/cache_layer.py", "_evict"), ("spkv/cache_layer.py", "update"),
    ("spkv/cache.py", "begin_forward"), ("spkv/convert.py", "_predictor_hook"), ("spkv/attention.py", "window_bias"),
    ("spkv/window.py", "append"), ("spkv/store.py", "attend"), ("spkv/store.py", "append"),
]


def step_times(model: torch.nn.Module, cache: Any, token: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            token = model(input_ids=token, **{CACHE_ARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return times, token


def profile_case(pool: common.ModelPool, context: int, batch: int, density: int, steps: int) -> dict[str, Any]:
    s = decode.DecodeSettings()
    result: dict[str, Any] = {"context": context, "batch": batch, "density": density}
    for name in ("static", f"density-{density}"):
        spec = decode.parse_cache(name)
        model = pool.get(spec.variant)
        cache = decode.make_cache(spec, model, context + 8 * steps)
        token = common.synthetic_fill(model, cache, batch, context, s.prefill_chunk)
        step_times(model, cache, token, 2)  # warmup
        times, token = step_times(model, cache, token, steps)
        result[f"{name}_step_ms"] = 1e3 * statistics.median(times)
        if name == "static":
            del cache
            gc.collect()
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        step_times(model, cache, token, steps)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
        cum = {}
        for (file, _, func), (_, calls, _, ct, _) in stats.items():
            for suffix, want in FUNCTIONS:
                if file.endswith(suffix) and func == want:
                    cum[f"{suffix}:{want}"] = {"ms_per_step": 1e3 * ct / steps, "calls_per_step": calls / steps}
        result["python_cumulative"] = cum
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step_times(model, cache, token, 2)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        result["aten_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / 2
        result["top_ops"] = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 2e3,
                              "share": e.self_cpu_time_total / total, "calls_per_step": e.count / 2} for e in top]
        kv = common.kv_bytes(cache)
        result["kv_read_mib"] = kv["read"] / machine.MIB
        del cache
        gc.collect()
    result["speedup_vs_static"] = result["static_step_ms"] / result[f"density-{density}_step_ms"]
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Decode-step profile: {result['model']} (fp32), density-{result['density']} SP-KV vs static, "
             f"torch threads {result['threads']}", "", f"command: `{result['provenance']['command']}` at commit "
             f"`{result['provenance']['commit'][:12]}`", ""]
    for case in result["cases"]:
        d = f"density-{case['density']}_step_ms"
        lines += [f"## context {case['context']}, batch {case['batch']}", "",
                  f"step: SP-KV {case[d]:.1f} ms, static {case['static_step_ms']:.1f} ms "
                  f"(speedup {case['speedup_vs_static']:.2f}x); aten ops per step: {case['aten_ops_per_step']:.0f}; "
                  f"SP-KV KV read {case['kv_read_mib']:.0f} MiB", "",
                  "| function (cProfile, cumulative) | ms / step | calls / step |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['ms_per_step']:.1f} | {v['calls_per_step']:.0f} |" for k, v in case["python_cumulative"].items()]
        lines += ["", "| aten op (torch.profiler, self CPU) | ms / step | share | calls / step |", "| --- | --- | --- | --- |"]
        lines += [f"| {o['op']} | {o['self_ms_per_step']:.1f} | {100 * o['share']:.1f}% | {o['calls_per_step']:.0f} |" for o in case["top_ops"]]
        lines.append("")
    lines += ["cProfile adds per-call overhead, so its absolute times are inflated for call-heavy code; compare "
              "the shares. Step times are medians of untraced steps.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--density", type=int, default=25)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", default="decode_profile", help="output file stem under --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = common.ModelPool(args.model, torch.float32, window=128, adapter=None)
    cases = []
    for context in args.contexts:
        cases.append(profile_case(pool, context, args.batch, args.density, args.steps))
        print(f"context {context}: done", file=sys.stderr, flush=True)
    result = {"model": args.model, "density": args.density, "threads": torch.get_num_threads(), "cases": cases}
    path = write_json(Path(args.out) / f"{args.name}.json", result)
    import json

    text = markdown(json.loads(path.read_text()))
    atomic_write_text(Path(args.out) / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()

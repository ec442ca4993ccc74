"""`spkv bench ...`: argument parsing for the benchmarks in spkv.bench."""

from __future__ import annotations

import argparse


def cmd_bench_decode(args: argparse.Namespace) -> None:
    from spkv.bench import decode
    from spkv.bench.common import iter_summary, settings_from
    from spkv.bench.decode_report import write_decode

    settings = settings_from(decode.DecodeSettings, vars(args), decode.QUICK_DECODE if args.quick else None)
    result = decode.run_decode(settings)
    paths = write_decode(result, settings.out)
    print("\n".join(iter_summary(result)))
    print(f"bandwidth {result['bandwidth']['bytes_per_s'] / 2**30:.2f} GiB/s; wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_bench_prefill(args: argparse.Namespace) -> None:
    from spkv.bench import prefill
    from spkv.bench.common import iter_summary, settings_from

    settings = settings_from(prefill.PrefillSettings, vars(args), prefill.QUICK_PREFILL if args.quick else None)
    result = prefill.run_prefill(settings)
    paths = prefill.write_prefill(result, settings.out)
    print("\n".join(iter_summary(result)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_bench_train(args: argparse.Namespace) -> None:
    from spkv.bench.train_step import run_train_bench, write_train_bench

    result = run_train_bench(args.model, args.seq_len, args.steps, args.warmup, args.train_llm, args.bf16, args.lkv)
    print(write_train_bench(result, args.out).read_text())


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    """Arguments both benchmarks share; None = the default (or the --quick default)."""
    p.add_argument("--model", help="spkv.load_model name/path, or `tiny` (a random Llama built in memory); default smollm2-135m")
    p.add_argument("--adapter", help="SP-KV adapter folder")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--prefill-chunk", type=int, help="prefill chunk in tokens (default 1024; decode: also the synthetic fill's chunk)")
    p.add_argument("--repeats", type=int, help="timing repetitions (default 3); the median is reported")
    p.add_argument("--window", type=int, help="SP-KV window of the converted model (default 128; an adapter keeps its own)")
    p.add_argument("--max-kv-gib", type=float, help="skip rows whose estimated KV cache exceeds this (default 12)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; --quick: 1)")
    p.add_argument("--out", help="output folder (default results/bench)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (model tiny unless --model is given)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="speed and memory benchmarks (decode, prefill)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bd = bsub.add_parser("decode", help="decode step time and KV memory across caches, contexts and batch sizes")
    _add_bench_args(bd)
    bd.add_argument("--caches", nargs="+", help="dynamic static spkv-adapter density-P window-only hybrid-export "
                    "(default: all but hybrid-export, P = 10 25 50)")
    bd.add_argument("--hybrid-export", help="folder of spkv hybrid export, for the hybrid-export cache")
    bd.add_argument("--steps", type=int, help="timed decode steps per repeat (default 16)")
    bd.add_argument("--warmup", type=int, help="untimed decode steps first (default 3)")
    bd.add_argument("--bandwidth-mib", type=int, help="size of the bandwidth-measuring copy (default 512)")
    bd.add_argument("--fill", choices=["synthetic", "model"],
                    help="how each cache gets its context: synthetic (default) = random K/V of the model's shapes through "
                         "the cache's own update/eviction, no model run; model = chunked prefill of the prompt. "
                         "spkv-adapter rows always use model fill")
    bd.add_argument("--max-model-fill-tokens", type=int,
                    help="with --fill synthetic: skip model-filled (spkv-adapter) rows whose context x batch exceeds this (default 16384)")
    bd.add_argument("--interleave", action="store_true", default=None,
                    help="at each (context, batch) fill every cache first, then time them in turn repeat by repeat, so drift "
                         "over the run hits each alike (all of a group's caches are alive at once: --max-kv-gib bounds their sum)")
    bd.set_defaults(func=cmd_bench_decode)
    bp = bsub.add_parser("prefill", help="chunked prefill time and memory: plain model vs SP-KV, predictor overhead")
    _add_bench_args(bp)
    bp.add_argument("--configs", nargs="+", help="rows to time: dynamic (always) spkv spkv-keep-all predictors-only (default: all)")
    bp.set_defaults(func=cmd_bench_prefill)

    bt = bsub.add_parser("train", help="SP-KV training step time vs plain fine-tuning of the same model")
    bt.add_argument("--model", default="smollm2-135m")
    bt.add_argument("--seq-len", type=int, default=2048)
    bt.add_argument("--steps", type=int, default=5)
    bt.add_argument("--warmup", type=int, default=1)
    bt.add_argument("--train-llm", default="lora", choices=["all", "lora", "none"])
    bt.add_argument("--lkv", action="store_true", help="also time LKV's recipe (budget 0.3, self-distillation)")
    bt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on where bf16 is fast here")
    bt.add_argument("--out", default="results/bench")
    bt.set_defaults(func=cmd_bench_train)

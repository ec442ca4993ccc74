"""The `spkv` command line. Each subcommand parses arguments and calls the library; the eval and
bench and hybrid subcommands are in spkv.cli.eval, spkv.cli.bench and spkv.cli.hybrid."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from spkv.cli import bench as bench_cli
from spkv.cli import eval as eval_cli
from spkv.cli import hybrid as hybrid_cli
from spkv.cli.common import add_dataclass_args, add_model_args, load_model_args, read_prompt


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from spkv.generate import generate_with_report

    prompt = read_prompt(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_args(args)
    budget = None
    if args.density is not None or args.max_kv_mb is not None:  # tau from a budget, on the user's own text
        import spkv

        if args.threshold is not None:
            raise SystemExit("error: give --threshold or a budget (--density / --max-kv-mb), not both")
        if args.hybrid_layout:
            raise SystemExit("error: a hybrid keeps what its layout says; --density / --max-kv-mb retune SP-KV's tau: not both")
        calibration = Path(args.calibration_file).read_text() if args.calibration_file else prompt
        context = len(tokenizer(prompt).input_ids) + args.max_new_tokens
        budget = spkv.calibrate(model, [calibration], tokenizer, density=args.density, context=context,
                                kv_bytes_limit=None if args.max_kv_mb is None else int(args.max_kv_mb * 2**20))
        print(f"budget: {budget.summary()}", file=sys.stderr)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    report = generate_with_report(
        model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, prefill_chunk_size=args.prefill_chunk,
        do_sample=args.sample, **sampling,
    )
    print(report.text)
    print("\n--- SP-KV cache report ---")
    print(f"model {args.model}, adapter {args.adapter or 'none'}, threshold {model.spkv_config.threshold}")
    print(report.summary())
    result = {"model": args.model, "adapter": args.adapter, "hybrid_layout": args.hybrid_layout,
              "threshold": model.spkv_config.threshold, **report.__dict__}
    if budget is not None:
        result["budget"] = budget.__dict__
    if args.compare_base:
        from spkv.models import load_model

        base, _ = load_model(args.model)
        torch.manual_seed(args.seed)
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = base.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
        base_ids = out[0, enc.input_ids.shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(base_ids, report.token_ids)) if a != b), min(len(base_ids), len(report.token_ids)))
        print(f"unconverted base model: the first {agree} of {len(report.token_ids)} generated tokens are identical")
        if args.adapter:
            print("(the adapter also changes the LLM's weights, so differences from the base model are expected)")
        result["tokens_identical_to_base"] = agree
    if args.json:
        from spkv.results import write_json

        write_json(args.json, result)


def cmd_train(args: argparse.Namespace) -> None:
    from spkv.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    saved = Path(args.out) / "train_config.json"
    if args.resume and values.get("bf16") is None and saved.exists():  # keep the run's precision, not this machine's default
        values["bf16"] = json.loads(saved.read_text())["bf16"]
    cfg = TrainConfig(**values)
    adapter = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if adapter.exists():
        print(f"adapter saved to {adapter}")
    else:
        print(f"stopped early at --max-steps {args.max_steps}; continue with --resume")


def cmd_show(args: argparse.Namespace) -> None:
    from spkv.eval.show import keep_map, write_show

    prompt = read_prompt(args)
    model, tokenizer = load_model_args(args)
    paths = write_show(keep_map(model, tokenizer, prompt, args.prefill_chunk), args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_data(args: argparse.Namespace) -> None:
    from spkv.data.corpus import build_corpus, corpus_dir

    out = build_corpus(args.out or corpus_dir(), heldout_fraction=args.heldout_fraction, seed=args.seed, skip_missing=args.skip_missing)
    print(json.dumps(json.loads((out / "manifest.json").read_text()), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkv", description="Self-Pruned KV attention for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with the compressed cache and report its size and speed")
    add_model_args(g)
    g.add_argument("--prompt-file")
    g.add_argument("--prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--prefill-chunk", type=int, default=512, help="prefill the prompt in chunks of this many tokens")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--density", type=float, help="set tau so this share of out-of-window pairs is kept, measured on the "
                   "prompt (or --calibration-file); instead of --threshold")
    g.add_argument("--max-kv-mb", type=float, help="set tau so the KV cache at prompt + new tokens fits this many MiB")
    g.add_argument("--calibration-file", help="text to calibrate --density / --max-kv-mb on (default: the prompt)")
    g.add_argument("--compare-base", action="store_true", help="also run the unconverted model and compare tokens")
    g.add_argument("--json", help="write the report as JSON to this file")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="two-phase SP-KV training (or --control: the dense control)")
    from spkv.train import TrainConfig

    add_dataclass_args(t, TrainConfig)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings)")
    t.add_argument("--max-steps", type=int, help="stop after this step (the schedule still spans --max-tokens)")
    t.set_defaults(func=cmd_train)

    eval_cli.add_parsers(sub)
    bench_cli.add_parsers(sub)

    sh = sub.add_parser("show", help="an HTML page (and PNG) of the tokens each layer / KV head keeps on your text")
    add_model_args(sh)
    sh.add_argument("--prompt-file")
    sh.add_argument("--prompt")
    sh.add_argument("--prefill-chunk", type=int, default=512)
    sh.add_argument("--out", default="results/show", help="folder for show.html, show.png, show.json")
    sh.set_defaults(func=cmd_show)

    hybrid_cli.add_parsers(sub)

    d = sub.add_parser("data", help="build the offline training/held-out corpus from packages")
    d.add_argument("--out", help="default: $SPKV_CORPUS or ~/.cache/spkv/corpus (where spkv train looks)")
    d.add_argument("--heldout-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--skip-missing", action="store_true")
    d.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from spkv.results import git_commit

    git_commit()  # result files record the code this run started from
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()

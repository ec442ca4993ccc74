"""What the `spkv` subcommands share: model arguments, loading, prompts, dataclass flags."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, gemma3-270m), local path or HF id")
    p.add_argument("--adapter", help="SP-KV adapter folder (from spkv train / save_adapter)")
    p.add_argument("--threshold", type=float, help="tau in [0, 1]: keep a pair leaving the window iff u >= tau")
    p.add_argument("--hybrid-layout", help="run the hybrid of this layout JSON (spkv hybrid design) on the model's weights "
                   "(with --adapter: the adapter's, e.g. the dense control)")


def add_heldout_args(p: argparse.ArgumentParser, sequences: int = 16) -> None:
    """--seq-len, --sequences, --heldout: the held-out set of spkv.data.heldout.heldout_set."""
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=sequences, help="held-out documents (one sequence each)")
    p.add_argument("--heldout", help="held-out .jsonl (default: the spkv data corpus)")


def load_model_args(args: argparse.Namespace):
    import spkv
    from spkv.models import load_model

    model, tokenizer = load_model(args.model)
    layout = getattr(args, "hybrid_layout", None)
    if layout:
        from spkv import hybrid

        if args.threshold is not None:
            raise ValueError("A hybrid has no threshold: give --hybrid-layout or --threshold, not both.")
        design = hybrid.HybridLayout.load(layout, model=args.model)
        if args.adapter:
            spkv.load_adapter(model, args.adapter)
        return hybrid.apply_layout(model, design), tokenizer
    if args.adapter:
        spkv.load_adapter(model, args.adapter)
    else:
        print("note: no --adapter; the predictors are untrained and keep (almost) every pair", file=sys.stderr)
        spkv.convert(model, spkv.SPKVConfig())
    if args.threshold is not None:
        spkv.set_threshold(model, args.threshold)
    return model, tokenizer


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"error: prompt file {path} does not exist")
        return path.read_text()
    if args.prompt is not None:
        return args.prompt
    raise SystemExit("error: give --prompt-file F or --prompt TEXT")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field, typed from its annotation, so CLI and config cannot drift."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # X | None -> X
        text = f.metadata.get("help", "") + (" (default: %(default)s)" if base is not bool else "")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="+", default=default, help=text)
        else:
            parser.add_argument(flag, type=base, default=default, help=text)

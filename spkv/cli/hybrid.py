"""`spkv hybrid ...`: probe a dense model, design a layout, export it, compare hybrids at equal memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spkv.cli.common import add_heldout_args

# The scores each design ranks by: the key in the score file, and the command that writes it.
_SCORES = {"learned": ("density_per_layer_head", "spkv analyze --adapter A --out DIR (DIR/analysis.json)"),
           "probe": ("attention_beyond_window_per_layer_head", "spkv hybrid probe --model M --out probe.json")}


def cmd_probe(args: argparse.Namespace) -> None:
    from spkv import hybrid
    from spkv.data.heldout import heldout_set
    from spkv.models import load_model
    from spkv.results import write_json

    model, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    layers, mass = hybrid.probe_attention(model, data.input_ids, args.window)
    write_json(Path(args.out), {"model": args.model, "window": args.window, "layers": layers, "seq_len": args.seq_len,
                                "doc_ids": data.doc_ids, _SCORES["probe"][0]: mass})
    print(f"probe of {args.model} on {len(data.doc_ids)} documents x {args.seq_len} tokens: wrote {args.out}")


def cmd_design(args: argparse.Namespace) -> None:
    from spkv import hybrid
    from spkv.results import atomic_write_text

    path = Path(args.scores)
    if not path.is_file():
        raise FileNotFoundError(f"No score file at {path}: write one with `{_SCORES['learned'][1]}` or `{_SCORES['probe'][1]}`.")
    data = json.loads(path.read_text())
    kind = args.design.split("-")[0]
    key = _SCORES[kind][0] if kind in _SCORES else next((k for k, _ in _SCORES.values() if k in data), None)
    if key not in data:
        need = _SCORES.get(kind, _SCORES["learned"])
        raise ValueError(f"{path} has no {need[0]}: the {args.design} design reads the file of `{need[1]}`.")
    layout = hybrid.design(data[key], data["layers"], args.budget, args.design, model=data["model"], window=data["window"],
                           seed=args.seed, sinks=args.sinks)
    atomic_write_text(args.out, layout.to_json())
    print(f"{args.design}: {100 * layout.global_share:.1f}% of {sum(map(len, layout.units))} units global; wrote {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from spkv import hybrid
    from spkv.models import load_model

    layout = hybrid.HybridLayout.load(args.layout, model=args.model)
    model, tokenizer = load_model(args.model)
    if args.adapter:  # the LLM weights to export, e.g. a dense control or a hybrid trained with the layout
        import spkv

        spkv.load_adapter(model, args.adapter)
    hybrid.apply_layout(model, layout)
    print(f"wrote {hybrid.export(model, layout, args.out, tokenizer)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from spkv.data.heldout import heldout_set
    from spkv.eval.hybrids import compare_hybrids, hybrids_markdown, plot_hybrids
    from spkv.hybrid import HybridLayout
    from spkv.models import load_model
    from spkv.results import PartialRun, atomic_write_text, merge_by

    for path in args.layouts:  # every layout checked before an hour of rows
        HybridLayout.load(path, model=args.model)
    _, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    out = Path(args.out)
    run = PartialRun(out, "hybrids")
    same_docs = [r for r in run.earlier()
                 if (r.get("model"), r.get("doc_ids"), r.get("seq_len")) == (args.model, data.doc_ids, args.seq_len)]
    done = merge_by(same_docs, "rows", "label")  # rows of an interrupted or finished run on these documents are kept
    result = compare_hybrids(args.model, args.control, args.adapter, args.tau, args.layouts, args.trained, data, done=done,
                             save=run.save)
    atomic_write_text(out / "hybrids.md", hybrids_markdown(result))
    plot_hybrids(result, out)
    run.finish(result)
    print(hybrids_markdown(result))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from spkv.hybrid import DESIGNS

    hy = sub.add_parser("hybrid", help="hybrid local-global layouts from the learned density, and their export")
    hysub = hy.add_subparsers(dest="hybrid_command", required=True)
    hp = hysub.add_parser("probe", help="the dense model's attention mass beyond the window per layer x KV head (probe-* designs)")
    hp.add_argument("--model", default="smollm2-135m")
    hp.add_argument("--window", type=int, default=128)
    add_heldout_args(hp, sequences=8)
    hp.add_argument("--out", required=True, help="probe JSON file")
    hp.set_defaults(func=cmd_probe)
    hd = hysub.add_parser("design", help="pick the units that stay global for a KV budget (a JSON layout)")
    hd.add_argument("--scores", required=True, help="learned-*: analysis.json of spkv analyze; probe-*: the file of spkv hybrid "
                    "probe; interleave / random-head: either (only its shape is read)")
    hd.add_argument("--budget", type=float, required=True, help="share of out-of-window memory kept, in (0, 1]")
    hd.add_argument("--design", default="learned-head", choices=DESIGNS)
    hd.add_argument("--seed", type=int, default=0, help="for random-head")
    hd.add_argument("--sinks", type=int, default=0, help="first tokens local units keep too (a layout with sinks does not export)")
    hd.add_argument("--out", required=True, help="layout JSON file")
    hd.set_defaults(func=cmd_design)
    hx = hysub.add_parser("export", help="a per-layer hybrid as a plain transformers checkpoint (sliding/full layer_types)")
    hx.add_argument("--model", default="smollm2-135m")
    hx.add_argument("--adapter", help="adapter whose LLM weights to export (e.g. the dense control or a trained hybrid); "
                    "default the base model")
    hx.add_argument("--layout", required=True, help="layout JSON of spkv hybrid design (a per-layer design)")
    hx.add_argument("--out", required=True)
    hx.set_defaults(func=cmd_export)
    hc = hysub.add_parser("compare", help="held-out NLL of the control, SP-KV and hybrids at equal KV memory (table and plot)")
    hc.add_argument("--model", default="smollm2-135m")
    hc.add_argument("--control", required=True, help="the dense control's adapter (its weights carry post-hoc layouts)")
    hc.add_argument("--adapter", required=True, help="the SP-KV adapter")
    hc.add_argument("--tau", type=float, default=0.5, help="SP-KV's threshold")
    hc.add_argument("--layouts", nargs="*", default=[], help="layout JSON files, run post-hoc on the control's weights")
    hc.add_argument("--trained", nargs="*", default=[], help="adapters of spkv train --hybrid-layout")
    add_heldout_args(hc)
    hc.add_argument("--out", default="results/hybrid", help="folder for hybrids.json, hybrids.md, hybrids.png")
    hc.set_defaults(func=cmd_compare)

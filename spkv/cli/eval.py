"""`spkv eval ...` and `spkv analyze`: argument parsing for the harness in spkv.eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spkv.cli.common import add_heldout_args, add_model_args, load_model_args


def cmd_eval_nll(args: argparse.Namespace) -> None:
    from spkv.data.corpus import default_corpus
    from spkv.data.heldout import heldout_set
    from spkv.eval.nll import sweep_markdown, threshold_sweep
    from spkv.models import load_model
    from spkv.results import atomic_write_text, write_json

    _, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    calibration = None
    if args.densities:  # tau for a target density is chosen on training-split documents, never the evaluated ones
        if args.calibration_sequences < 1:
            raise SystemExit(f"error: --calibration-sequences must be at least 1, got {args.calibration_sequences}")
        calibration = list(heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.calibration_sequences,
                                       corpus=args.calibration_corpus or default_corpus() / "train.jsonl").input_ids)
    result = threshold_sweep(args.model, args.adapter, args.control, args.thresholds, data, args.densities or [], calibration)
    out = Path(args.out)
    write_json(out / "nll_sweep.json", result)
    table = sweep_markdown(result)
    atomic_write_text(out / "nll_sweep.md", table)
    print(table)


def cmd_eval_matched(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from spkv.data.corpus import default_corpus
    from spkv.data.heldout import heldout_set
    from spkv.eval.matched import MatchSettings, compare, matched_markdown, plot_matched
    from spkv.models import load_model
    from spkv.results import PartialRun, adapter_digest, atomic_write_text

    learned = _learned_args(args.learned or [], args.methods)
    control = None if args.control == "base" else args.control  # base: the frozen-LLM table
    _, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    kvzap_train = None
    if "kvzap" in args.methods:  # training-split text for the surrogate's fit
        kvzap_train = heldout_set(tokenizer, seq_len=args.kvzap_seq_len, max_sequences=args.kvzap_sequences,
                                  corpus=default_corpus() / "train.jsonl").input_ids
    out = Path(args.out)
    settings = MatchSettings(chunk=args.chunk, calibration_sequences=args.calibration_sequences,
                             exactness_sequences=args.exactness_sequences, exactness_tokens=args.exactness_tokens)
    # what the table's rows depend on: an earlier run's rows are reused only if it matches
    head = {"model": args.model, "adapter": args.adapter, "adapter_sha256": adapter_digest(args.adapter),
            "control": control, "control_sha256": None if control is None else adapter_digest(control), "tau": args.tau,
            "seq_len": int(data.input_ids.shape[1]), "doc_ids": data.doc_ids, "settings": asdict(settings)}
    run = PartialRun(out, "matched")
    done = _reusable_rows(run.earlier(), head, out) if args.resume else {}
    result = compare(args.model, args.adapter, control, args.tau, args.methods, data, settings, out,
                     kvzap_train=kvzap_train, done=done, save=lambda partial: run.save({**head, **partial}), learned=learned)
    result = {**result, **head}
    atomic_write_text(out / "matched.md", matched_markdown(result))
    plot_matched(result, out)
    run.finish(result)
    print(matched_markdown(result))


def _reusable_rows(runs: list[dict], head: dict, out: Path) -> dict[str, dict]:
    """Rows (by method) of the earlier runs of the same table, the partial file's first: a run
    stopped after a finished one holds only the rows it reached, the finished one the rest."""
    from spkv.results import merge_by

    return merge_by(_same_table(runs, head, out), "rows", "method")


def _same_table(runs: list[dict], head: dict, out: Path) -> list[dict]:
    """The earlier runs (partial, finished) made for the same inputs as `head`. A field an older file
    lacks (e.g. the digests, recorded since) is not compared."""
    keep = []
    for r in runs:
        differ = [k for k, v in head.items() if k in r and r[k] != v]
        if differ:
            print(f"note: an earlier table in {out} was made with another {', '.join(differ)}: its rows run again", file=sys.stderr)
        else:
            keep.append(r)
    return keep


def _learned_args(items: list[str], methods: list[str]) -> dict[str, str]:
    """--learned LABEL=ADAPTER ... -> {label: folder}; labels must be new row names, folders adapters."""
    taken = {"base model", "SP-KV", "dense control", *methods}
    learned: dict[str, str] = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--learned takes LABEL=ADAPTER (e.g. 'LKV, LLM frozen=adapters/lkv/smollm2-135m-lkv-frozen'), got {item!r}")
        if label in taken or label in learned:
            raise SystemExit(f"--learned label {label!r} is already a row of the table: give each learned adapter its own label")
        if not (Path(folder) / "adapter_config.json").exists():
            raise SystemExit(f"--learned {label}: {folder} has no adapter_config.json (an adapter folder of spkv train)")
        learned[label] = folder
    return learned


def _max_new_tokens(args: argparse.Namespace) -> int | None:
    return args.max_new_tokens or (16 if args.quick else None)


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from spkv.eval.tasks import runner
    from spkv.results import PartialRun, atomic_write_text

    references = _task_references(args.reference)
    methods = runner.parse_methods(args.methods, args.method_thresholds, calibrated=args.match_density is not None)
    model, tokenizer = load_model_args(argparse.Namespace(model=args.model, adapter=args.adapter, threshold=None,
                                                          hybrid_layout=args.hybrid_layout))
    if args.hybrid_layout:  # the layout decodes as `spkv` (its constant gates): say which layout it is
        if set(args.methods) - {"dense", "spkv"}:
            raise SystemExit("With --hybrid-layout, --methods takes dense and spkv (the hybrid); run the post-hoc "
                             "policies on the control without a layout.")
        from dataclasses import replace

        methods = [replace(m, display=f"hybrid {Path(args.hybrid_layout).stem}") if m.name == "spkv" else m for m in methods]
    out = Path(args.out)
    config = runner.TaskConfig(haystack=args.haystack, corpus=args.heldout, answer_prefix=args.answer_prefix)
    tasks, max_new = args.tasks or list(runner.TASKS), _max_new_tokens(args)
    calibration = None
    if args.match_density is not None:  # every method without a threshold calibrated to this density
        calibration = runner.calibrate_suite(
            model, tokenizer, methods, args.match_density, out / "calibration.json", on=args.calibrate_on,
            tokens=args.calibration_len, prefill_chunk=args.prefill_chunk, tasks=tasks, seed=args.seed, config=config,
            max_new_tokens=max_new, heldout=args.heldout, sequences=args.calibration_sequences, resume=args.resume)
        methods = runner.with_calibration(methods, calibration)
    run = PartialRun(out, "tasks")
    head = {"model": args.model, "adapter": args.adapter, "hybrid_layout": args.hybrid_layout, "calibration": calibration,
            "references": args.reference or []}
    result = runner.run_methods(
        model, tokenizer, methods, lengths=args.lengths or ([512] if args.quick else runner.DEFAULT_LENGTHS),
        tasks=tasks, samples_per_cell=args.samples or (1 if args.quick else 4), seed=args.seed,
        max_new_tokens=max_new, prefill_chunk=args.prefill_chunk, config=config,
        resume=runner.resume_from(run.earlier()) if args.resume else None,
        save=lambda partial_result: run.save({**head, **partial_result}),
    )
    table = _task_table({**head, **result}, references)
    atomic_write_text(out / "tasks.md", table)
    run.finish({**head, **result})
    print(table)


def _task_references(specs: list[str] | None) -> dict[str, tuple[dict, dict]]:
    from spkv.eval.tasks.report import load_reference

    return {name: (result, run) for name, result, run in map(load_reference, specs or [])}


def _task_table(result: dict, references: dict[str, tuple[dict, dict]]) -> str:
    from spkv.eval.tasks.report import check_comparable, tasks_markdown

    for name, (ref_result, _) in references.items():
        check_comparable(result, ref_result, name)
    return tasks_markdown(result, {name: run for name, (_, run) in references.items()})


def cmd_eval_tasks_compare(args: argparse.Namespace) -> None:
    from spkv.eval.tasks.report import comparison, comparison_markdown, mean_run
    from spkv.results import atomic_write_text, write_json

    rows, references = _task_references(args.rows), _task_references(args.reference)
    notes = ["RULER-style tasks: mean score (%) [95% bootstrap interval over samples] per length and over all cells, "
             "each system from its own run on the same prompts; retention over all cells on the same samples."]
    for spec in args.mean or []:
        name, sep, parts = spec.partition("=")
        members = [m.strip() for m in parts.split(",")]
        if not sep or not name or name in rows or len(members) < 2 or any(m not in rows for m in members):
            raise ValueError(f"--mean takes NAME=ROW,ROW[,...]: a new NAME and rows given to --rows ({', '.join(rows)}), "
                             f"got {spec!r}")
        rows[name] = (rows[members[0]][0], mean_run([rows[m][1] for m in members], name))
        notes.append(f"{name}: the expected score of one of {', '.join(members)} drawn uniformly at random "
                     "(their mean per sample).")
    table = comparison(rows, references, versus=args.versus)
    out = Path(args.out)
    write_json(out / "compare.json", {**table, "rows_from": args.rows, "means": args.mean or [],
                                      "references_from": args.reference or []})
    text = "\n".join(notes) + "\n\n" + comparison_markdown(table)
    atomic_write_text(out / "compare.md", text)
    print(text)


def cmd_eval_tasks_report(args: argparse.Namespace) -> None:
    from spkv.results import atomic_write_text

    path = Path(args.result)
    if not path.is_file():
        raise FileNotFoundError(f"No task result at {path}: run `spkv eval tasks` first.")
    result = json.loads(path.read_text())
    table = _task_table(result, _task_references(args.reference or result.get("references")))
    atomic_write_text(Path(args.out) if args.out else path.with_suffix(".md"), table)
    print(table)


def cmd_eval_lm_eval(args: argparse.Namespace) -> None:
    from spkv.eval.lm_eval_harness import HarnessConfig, results_markdown, run_tasks
    from spkv.results import atomic_write_text, write_json

    model, tokenizer = load_model_args(args)
    config = HarnessConfig(tasks=[t for t in args.tasks.split(",") if t], include_path=args.include_path,
                           limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    result = run_tasks(model, tokenizer, config)
    out = Path(args.out)
    write_json(out / "lm_eval.json", {"model": args.model, "adapter": args.adapter, "hybrid_layout": args.hybrid_layout, **result})
    atomic_write_text(out / "lm_eval.md", results_markdown(result))
    print(results_markdown(result))


def cmd_analyze(args: argparse.Namespace) -> None:
    from spkv.adapter import load_adapter
    from spkv.convert import set_threshold
    from spkv.eval.analysis import (
        analysis_markdown,
        analyze,
        compare_beside,
        documents_by_length,
        plot_analysis,
    )
    from spkv.models import load_model
    from spkv.results import atomic_write_text, write_json

    beside = None
    if args.beside:  # read first: a wrong path should not cost the whole analysis
        if not Path(args.beside).is_file():
            raise SystemExit(f"--beside: no analysis file {args.beside} (spkv analyze writes OUT/analysis.json)")
        beside = json.loads(Path(args.beside).read_text())
        if beside.get("model") != args.model:
            raise SystemExit(f"--beside: {args.beside} analyses {beside.get('model')!r}, not {args.model!r}")
    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter)
    if beside is not None and beside.get("layers") != model.spkv_config.layers:
        raise SystemExit(f"--beside: {args.beside} maps layers {beside.get('layers')}, this adapter gates {model.spkv_config.layers}")
    if args.threshold is not None:
        set_threshold(model, args.threshold)
    if args.budget is not None:
        from spkv.lkv import set_budget

        set_budget(model, args.budget)
    max_len = args.max_len or model.config.get_text_config(decoder=True).max_position_embeddings
    docs = documents_by_length(tokenizer, args.heldout, args.documents, args.min_len, max_len)
    result = {"model": args.model, "adapter": args.adapter, **analyze(model, docs)}
    if beside is not None:
        result["beside"] = compare_beside(result, beside, args.beside)
    out = Path(args.out)
    write_json(out / "analysis.json", result)
    atomic_write_text(out / "analysis.md", analysis_markdown(result))
    plot_analysis(result, out, beside)
    print(analysis_markdown(result))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="quality and density on held-out text")
    esub = e.add_subparsers(dest="eval_command", required=True)
    en = esub.add_parser("nll", help="held-out NLL of base, dense control and SP-KV at several thresholds")
    en.add_argument("--model", default="smollm2-135m")
    en.add_argument("--adapter", required=True)
    en.add_argument("--control", help="the dense control's adapter (spkv train --control)")
    en.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    en.add_argument("--densities", type=float, nargs="+", metavar="D",
                    help="also SP-KV at these target densities (e.g. 0.25), tau calibrated on training-split documents")
    en.add_argument("--calibration-sequences", type=int, default=4, help="training-split documents for --densities")
    en.add_argument("--calibration-corpus", help=".jsonl to calibrate --densities on (default: the spkv data corpus's train.jsonl)")
    add_heldout_args(en)
    en.add_argument("--out", default="results/train")
    en.set_defaults(func=cmd_eval_nll)
    em = esub.add_parser("matched", help="SP-KV vs post-hoc baselines at matched density (the paper's main table)")
    em.add_argument("--model", default="smollm2-135m")
    em.add_argument("--adapter", required=True)
    em.add_argument("--control", required=True, help="the dense control's adapter: baselines run on it and dNLL%% is against it; "
                    "'base': they run on the untouched base model, against it (the reference for frozen-LLM learned rows)")
    em.add_argument("--tau", type=float, default=0.5, help="SP-KV threshold; its density is the baselines' target")
    em.add_argument("--methods", nargs="+", default=["streaming", "h2o", "tova", "key_norm", "expected_attention", "kvzap", "random"],
                    help="scoring policies (spkv.policies.POLICIES)")
    add_heldout_args(em)
    em.add_argument("--chunk", type=int, default=32, help="prefill chunk for attention-based baselines (error vs chunk 1 is measured)")
    em.add_argument("--calibration-sequences", type=int, default=4)
    em.add_argument("--exactness-sequences", type=int, default=1, help="documents re-run token by token to measure the chunking error")
    em.add_argument("--exactness-tokens", type=int, default=1024, help="... on their first tokens")
    em.add_argument("--kvzap-sequences", type=int, default=16, help="training-split sequences to fit the KVzap surrogate")
    em.add_argument("--kvzap-seq-len", type=int, default=1024)
    em.add_argument("--learned", nargs="+", metavar="LABEL=ADAPTER",
                    help="other learned adapters at the same density, each on its own weights (an SP-KV gate trained "
                         "another way: tau calibrated; an LKV adapter: budget r scaled)")
    em.add_argument("--resume", action="store_true",
                    help="reuse the rows of an interrupted or finished run of the same table (OUT/matched*.json)")
    em.add_argument("--out", default="results/eval")
    em.set_defaults(func=cmd_eval_matched)
    et = esub.add_parser("tasks", help="RULER-style long-context tasks (needles, variable tracking, word extraction) per method")
    et.add_argument("--model", default="smollm2-135m")
    et.add_argument("--adapter", help="SP-KV adapter (without one the predictors are untrained and keep almost every pair)")
    et.add_argument("--hybrid-layout", help="run this hybrid layout (spkv hybrid design) on the adapter's weights (e.g. the "
                    "dense control's) as method spkv")
    et.add_argument("--lengths", type=int, nargs="+", help="target lengths in tokens (default 1024 2048 4096 8192; --quick 512); "
                    "lengths beyond the model's positions are skipped")
    et.add_argument("--tasks", nargs="+", help="default: all of niah_single niah_multikey niah_multivalue niah_multiquery vt cwe fwe")
    et.add_argument("--samples", type=int, help="samples per task x length (default 4; --quick 1)")
    et.add_argument("--seed", type=int, default=0)
    et.add_argument("--methods", nargs="+", default=["dense", "spkv"],
                    help="dense (keep every pair), spkv (the adapter's predictor) or policy names (spkv.policies.POLICIES)")
    et.add_argument("--threshold", dest="method_thresholds", nargs="+", metavar="NAME=VALUE",
                    help="threshold per method, e.g. spkv=0.5 h2o=0.01 (default: spkv the adapter's tau, policies their own)")
    et.add_argument("--max-new-tokens", type=int, help="answer budget (default per task as in RULER; --quick 16)")
    et.add_argument("--prefill-chunk", type=int, default=512)
    et.add_argument("--haystack", choices=["noise", "corpus"], default="noise", help="filler: RULER's noise sentences or held-out text")
    et.add_argument("--heldout", help="held-out .jsonl for --haystack corpus (default: the spkv data corpus)")
    et.add_argument("--quick", action="store_true", help="a smoke run: 512 tokens, 1 sample, 16 new tokens")
    et.add_argument("--answer-prefix", choices=["base", "ruler"], default="base",
                    help="how prompts end: 'base' for base models (singular '... is', 'VAR'), 'ruler' RULER's own wording")
    et.add_argument("--match-density", type=float, help="calibrate every method without a --threshold (policies and "
                    "spkv's tau) to this density (mean over layers x heads) first, as spkv eval matched does")
    et.add_argument("--calibrate-on", choices=["tasks", "heldout"], default="tasks",
                    help="--match-density on one prompt per task (indices never evaluated) or on held-out documents")
    et.add_argument("--calibration-sequences", type=int, default=2, help="held-out documents for --calibrate-on heldout")
    et.add_argument("--calibration-len", type=int, default=2048, help="tokens of each calibration prompt or document")
    et.add_argument("--resume", action="store_true", help="reuse the samples of an earlier run with the same settings "
                    "(OUT/tasks.partial.json, else OUT/tasks.json): an interrupted run continues, --samples can grow")
    et.add_argument("--out", default="results/tasks")
    et.add_argument("--reference", nargs="+", metavar="NAME=FILE[:LABEL]",
                    help="also report retention against another run's method (default its dense one), e.g. "
                         "base=results/tasks/gemma3/tasks.json; the runs must share task settings")
    et.set_defaults(func=cmd_eval_tasks)
    etr = esub.add_parser("tasks-report", help="the task table of a finished (or partial) run, with intervals and references")
    etr.add_argument("--result", required=True, help="tasks.json (or tasks.partial.json) of spkv eval tasks")
    etr.add_argument("--reference", nargs="+", metavar="NAME=FILE[:LABEL]", help="as for spkv eval tasks (default: the run's own)")
    etr.add_argument("--out", help="markdown file (default: the result's name with .md)")
    etr.set_defaults(func=cmd_eval_tasks_report)
    etc = esub.add_parser("tasks-compare", help="one table of several task runs' systems (e.g. control, SP-KV, hybrids)")
    etc.add_argument("--rows", nargs="+", required=True, metavar="NAME=FILE[:LABEL]",
                     help="a row per system: a run's method (default its dense one), e.g. 'SP-KV=results/tasks/gemma3-spkv/tasks.json:spkv'")
    etc.add_argument("--mean", nargs="+", metavar="NAME=ROW,ROW[,...]",
                     help="a row for a system that is one of these rows drawn uniformly at random (its expected score "
                          "per sample), e.g. a random global layer when the rows are every possible layout")
    etc.add_argument("--reference", nargs="+", metavar="NAME=FILE[:LABEL]", help="retention against these (as for spkv eval tasks)")
    etc.add_argument("--versus", nargs="+", metavar="NAME", help="rows (e.g. the best baseline, an ablation's reference) "
                     "every other row's paired score difference is measured from, per length, with its interval")
    etc.add_argument("--out", required=True, help="folder for compare.json and compare.md")
    etc.set_defaults(func=cmd_eval_tasks_compare)
    el = esub.add_parser("lm-eval", help="lm-evaluation-harness tasks on the SP-KV model (needs the tasks' datasets)")
    add_model_args(el)
    el.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    el.add_argument("--include-path", help="folder of extra task YAMLs (local data)")
    el.add_argument("--limit", type=int, help="documents per task")
    el.add_argument("--num-fewshot", type=int)
    el.add_argument("--batch-size", type=int, default=1, help="1 keeps the loglikelihood density count exact")
    el.add_argument("--out", default="results/lm_eval")
    el.set_defaults(func=cmd_eval_lm_eval)

    a = sub.add_parser("analyze", help="where an SP-KV or LKV model keeps memory: density per layer x head and against length")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--adapter", required=True)
    a.add_argument("--threshold", type=float, help="tau (default: the adapter's)")
    a.add_argument("--budget", type=float, help="an LKV adapter's budget r (default: the adapter's)")
    a.add_argument("--documents", type=int, default=12, help="held-out documents, spread over lengths")
    a.add_argument("--min-len", type=int, default=512)
    a.add_argument("--max-len", type=int, help="cap on a document's tokens (default: the model's positions)")
    a.add_argument("--heldout", help="held-out .jsonl (default: the spkv data corpus)")
    a.add_argument("--beside", metavar="ANALYSIS_JSON", help="another adapter's analysis.json whose density map is drawn "
                   "beside this one (e.g. SP-KV's next to LKV's learned budgets)")
    a.add_argument("--out", default="results/analysis")
    a.set_defaults(func=cmd_analyze)

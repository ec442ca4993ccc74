"""The `spkv` command line. Each subcommand parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m, gemma3-270m), local path or HF id")
    p.add_argument("--adapter", help="SP-KV adapter folder (from spkv train / save_adapter)")
    p.add_argument("--threshold", type=float, help="tau in [0, 1]: keep a pair leaving the window iff u >= tau")


def _load(args: argparse.Namespace):
    import spkv
    from spkv.models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        spkv.load_adapter(model, args.adapter)
    else:
        print("note: no --adapter; the predictors are untrained and keep (almost) every pair", file=sys.stderr)
        spkv.convert(model, spkv.SPKVConfig())
    if args.threshold is not None:
        spkv.set_threshold(model, args.threshold)
    return model, tokenizer


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"error: prompt file {path} does not exist")
        return path.read_text()
    if args.prompt is not None:
        return args.prompt
    raise SystemExit("error: give --prompt-file F or --prompt TEXT")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from spkv.generate import generate_with_report

    prompt = _read_prompt(args)
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args)
    budget = None
    if args.density is not None or args.max_kv_mb is not None:  # tau from a budget, on the user's own text
        import spkv

        if args.threshold is not None:
            raise SystemExit("error: give --threshold or a budget (--density / --max-kv-mb), not both")
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
    result = {"model": args.model, "adapter": args.adapter, "threshold": model.spkv_config.threshold, **report.__dict__}
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


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
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


def cmd_train(args: argparse.Namespace) -> None:
    from spkv.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    adapter = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if adapter.exists():
        print(f"adapter saved to {adapter}")
    else:
        print(f"stopped early at --max-steps {args.max_steps}; continue with --resume")


def cmd_eval_nll(args: argparse.Namespace) -> None:
    from spkv.data.heldout import heldout_set
    from spkv.eval.nll import sweep_markdown, threshold_sweep
    from spkv.models import load_model
    from spkv.results import atomic_write_text, write_json

    _, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    result = threshold_sweep(args.model, args.adapter, args.control, args.thresholds, data)
    out = Path(args.out)
    write_json(out / "nll_sweep.json", result)
    table = sweep_markdown(result)
    atomic_write_text(out / "nll_sweep.md", table)
    print(table)


def cmd_eval_matched(args: argparse.Namespace) -> None:
    from spkv.data.corpus import default_corpus
    from spkv.data.heldout import heldout_set
    from spkv.eval.matched import MatchSettings, compare, matched_markdown, plot_matched
    from spkv.models import load_model
    from spkv.results import PartialRun, atomic_write_text, merge_by

    _, tokenizer = load_model(args.model)
    data = heldout_set(tokenizer, seq_len=args.seq_len, max_sequences=args.sequences, corpus=args.heldout)
    kvzap_train = None
    if "kvzap" in args.methods:  # training-split text for the surrogate's fit
        kvzap_train = heldout_set(tokenizer, seq_len=args.kvzap_seq_len, max_sequences=args.kvzap_sequences,
                                  corpus=default_corpus() / "train.jsonl").input_ids
    out = Path(args.out)
    run = PartialRun(out, "matched")
    done = merge_by(run.earlier()[:1], "rows", "method") if args.resume and run.partial.exists() else {}
    settings = MatchSettings(chunk=args.chunk, calibration_sequences=args.calibration_sequences,
                             exactness_sequences=args.exactness_sequences, exactness_tokens=args.exactness_tokens)
    result = compare(args.model, args.adapter, args.control, args.tau, args.methods, data, settings, out,
                     kvzap_train=kvzap_train, done=done, save=run.save)
    atomic_write_text(out / "matched.md", matched_markdown(result))
    plot_matched(result, out)
    run.finish(result)
    print(matched_markdown(result))


def _max_new_tokens(args: argparse.Namespace) -> int | None:
    return args.max_new_tokens or (16 if args.quick else None)


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from spkv.eval.tasks import runner
    from spkv.results import PartialRun, atomic_write_text

    references = _task_references(args.reference)
    methods = runner.parse_methods(args.methods, args.method_thresholds, calibrated=args.match_density is not None)
    model, tokenizer = _load(argparse.Namespace(model=args.model, adapter=args.adapter, threshold=None))
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
    head = {"model": args.model, "adapter": args.adapter, "calibration": calibration, "references": args.reference or []}
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

    model, tokenizer = _load(args)
    config = HarnessConfig(tasks=[t for t in args.tasks.split(",") if t], include_path=args.include_path,
                           limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    result = run_tasks(model, tokenizer, config)
    out = Path(args.out)
    write_json(out / "lm_eval.json", {"model": args.model, "adapter": args.adapter, **result})
    atomic_write_text(out / "lm_eval.md", results_markdown(result))
    print(results_markdown(result))


def cmd_analyze(args: argparse.Namespace) -> None:
    from spkv.adapter import load_adapter
    from spkv.convert import set_threshold
    from spkv.eval.analysis import (
        analysis_markdown,
        analyze,
        documents_by_length,
        plot_analysis,
    )
    from spkv.models import load_model
    from spkv.results import atomic_write_text, write_json

    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter)
    if args.threshold is not None:
        set_threshold(model, args.threshold)
    max_len = args.max_len or model.config.get_text_config(decoder=True).max_position_embeddings
    docs = documents_by_length(tokenizer, args.heldout, args.documents, args.min_len, max_len)
    result = {"model": args.model, "adapter": args.adapter, **analyze(model, docs)}
    out = Path(args.out)
    write_json(out / "analysis.json", result)
    atomic_write_text(out / "analysis.md", analysis_markdown(result))
    plot_analysis(result, out)
    print(analysis_markdown(result))


def cmd_show(args: argparse.Namespace) -> None:
    from spkv.eval.show import keep_map, write_show

    prompt = _read_prompt(args)
    model, tokenizer = _load(args)
    paths = write_show(keep_map(model, tokenizer, prompt, args.prefill_chunk), args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_data(args: argparse.Namespace) -> None:
    from spkv.data.corpus import build_corpus, corpus_dir

    out = build_corpus(args.out or corpus_dir(), heldout_fraction=args.heldout_fraction, seed=args.seed, skip_missing=args.skip_missing)
    print(json.dumps(json.loads((out / "manifest.json").read_text()), indent=2))


def cmd_bench_decode(args: argparse.Namespace) -> None:
    from spkv.bench import decode
    from spkv.bench.common import iter_summary, settings_from

    settings = settings_from(decode.DecodeSettings, vars(args), decode.QUICK_DECODE if args.quick else None)
    result = decode.run_decode(settings)
    paths = decode.write_decode(result, settings.out)
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

    result = run_train_bench(args.model, args.seq_len, args.steps, args.warmup, args.train_llm, args.bf16)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkv", description="Self-Pruned KV attention for Hugging Face models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with the compressed cache and report its size and speed")
    _add_model_args(g)
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

    _add_dataclass_args(t, TrainConfig)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same settings)")
    t.add_argument("--max-steps", type=int, help="stop after this step (the schedule still spans --max-tokens)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="quality and density on held-out text")
    esub = e.add_subparsers(dest="eval_command", required=True)
    en = esub.add_parser("nll", help="held-out NLL of base, dense control and SP-KV at several thresholds")
    en.add_argument("--model", default="smollm2-135m")
    en.add_argument("--adapter", required=True)
    en.add_argument("--control", help="the dense control's adapter (spkv train --control)")
    en.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    en.add_argument("--seq-len", type=int, default=2048)
    en.add_argument("--sequences", type=int, default=16, help="held-out documents (one sequence each)")
    en.add_argument("--heldout", help="held-out .jsonl (default: the spkv data corpus)")
    en.add_argument("--out", default="results/train")
    en.set_defaults(func=cmd_eval_nll)
    em = esub.add_parser("matched", help="SP-KV vs post-hoc baselines at matched density (the paper's main table)")
    em.add_argument("--model", default="smollm2-135m")
    em.add_argument("--adapter", required=True)
    em.add_argument("--control", required=True, help="the dense control's adapter: baselines run on it and dNLL%% is against it")
    em.add_argument("--tau", type=float, default=0.5, help="SP-KV threshold; its density is the baselines' target")
    em.add_argument("--methods", nargs="+", default=["streaming", "h2o", "tova", "key_norm", "expected_attention", "kvzap", "random"],
                    help="scoring policies (spkv.policies.POLICIES)")
    em.add_argument("--seq-len", type=int, default=2048)
    em.add_argument("--sequences", type=int, default=16, help="held-out documents (one sequence each)")
    em.add_argument("--heldout", help="held-out .jsonl (default: the spkv data corpus)")
    em.add_argument("--chunk", type=int, default=32, help="prefill chunk for attention-based baselines (error vs chunk 1 is measured)")
    em.add_argument("--calibration-sequences", type=int, default=4)
    em.add_argument("--exactness-sequences", type=int, default=1, help="documents re-run token by token to measure the chunking error")
    em.add_argument("--exactness-tokens", type=int, default=1024, help="... on their first tokens")
    em.add_argument("--kvzap-sequences", type=int, default=16, help="training-split sequences to fit the KVzap surrogate")
    em.add_argument("--kvzap-seq-len", type=int, default=1024)
    em.add_argument("--resume", action="store_true", help="reuse the rows of an interrupted run (OUT/matched.partial.json)")
    em.add_argument("--out", default="results/eval")
    em.set_defaults(func=cmd_eval_matched)
    et = esub.add_parser("tasks", help="RULER-style long-context tasks (needles, variable tracking, word extraction) per method")
    et.add_argument("--model", default="smollm2-135m")
    et.add_argument("--adapter", help="SP-KV adapter (without one the predictors are untrained and keep almost every pair)")
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
    el = esub.add_parser("lm-eval", help="lm-evaluation-harness tasks on the SP-KV model (needs the tasks' datasets)")
    _add_model_args(el)
    el.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    el.add_argument("--include-path", help="folder of extra task YAMLs (local data)")
    el.add_argument("--limit", type=int, help="documents per task")
    el.add_argument("--num-fewshot", type=int)
    el.add_argument("--batch-size", type=int, default=1, help="1 keeps the loglikelihood density count exact")
    el.add_argument("--out", default="results/lm_eval")
    el.set_defaults(func=cmd_eval_lm_eval)

    a = sub.add_parser("analyze", help="where an SP-KV model keeps memory: density per layer x head and against length")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--adapter", required=True)
    a.add_argument("--threshold", type=float, help="tau (default: the adapter's)")
    a.add_argument("--documents", type=int, default=12, help="held-out documents, spread over lengths")
    a.add_argument("--min-len", type=int, default=512)
    a.add_argument("--max-len", type=int, help="cap on a document's tokens (default: the model's positions)")
    a.add_argument("--heldout", help="held-out .jsonl (default: the spkv data corpus)")
    a.add_argument("--out", default="results/analysis")
    a.set_defaults(func=cmd_analyze)

    b = sub.add_parser("bench", help="speed and memory benchmarks (decode, prefill)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bd = bsub.add_parser("decode", help="decode step time and KV memory across caches, contexts and batch sizes")
    _add_bench_args(bd)
    bd.add_argument("--caches", nargs="+", help="dynamic static spkv-adapter density-P window-only (default: all, P = 10 25 50)")
    bd.add_argument("--steps", type=int, help="timed decode steps per repeat (default 16)")
    bd.add_argument("--warmup", type=int, help="untimed decode steps first (default 3)")
    bd.add_argument("--bandwidth-mib", type=int, help="size of the bandwidth-measuring copy (default 512)")
    bd.add_argument("--fill", choices=["synthetic", "model"],
                    help="how each cache gets its context: synthetic (default) = random K/V of the model's shapes through "
                         "the cache's own update/eviction, no model run; model = chunked prefill of the prompt. "
                         "spkv-adapter rows always use model fill")
    bd.add_argument("--max-model-fill-tokens", type=int,
                    help="with --fill synthetic: skip model-filled (spkv-adapter) rows whose context x batch exceeds this (default 16384)")
    bd.set_defaults(func=cmd_bench_decode)
    bp = bsub.add_parser("prefill", help="chunked prefill time and memory: plain model vs SP-KV, predictor overhead")
    _add_bench_args(bp)
    bp.set_defaults(func=cmd_bench_prefill)

    bt = bsub.add_parser("train", help="SP-KV training step time vs plain fine-tuning of the same model")
    bt.add_argument("--model", default="smollm2-135m")
    bt.add_argument("--seq-len", type=int, default=2048)
    bt.add_argument("--steps", type=int, default=5)
    bt.add_argument("--warmup", type=int, default=1)
    bt.add_argument("--train-llm", default="lora", choices=["all", "lora", "none"])
    bt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on where bf16 is fast here")
    bt.add_argument("--out", default="results/bench")
    bt.set_defaults(func=cmd_bench_train)

    sh = sub.add_parser("show", help="an HTML page (and PNG) of the tokens each layer / KV head keeps on your text")
    _add_model_args(sh)
    sh.add_argument("--prompt-file")
    sh.add_argument("--prompt")
    sh.add_argument("--prefill-chunk", type=int, default=512)
    sh.add_argument("--out", default="results/show", help="folder for show.html, show.png, show.json")
    sh.set_defaults(func=cmd_show)

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

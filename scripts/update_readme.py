"""Regenerate the README's headline table and the tables of docs/results.md from the result files.

No number in these tables is typed by hand. Each block between `<!-- results:NAME -->` and
`<!-- /results:NAME -->` is replaced:
  * README.md, block `headline`: one table built from results/eval/smollm2/matched.json (quality at
    matched density) and results/bench/decode.json (KV memory and decode speed);
  * docs/results.md, every block in BLOCKS: the markdown file a run wrote, plus a link to its JSON
    (which carries the command, commit, machine and date).
A block that is missing from its file is left alone (nothing is appended). Idempotent: a second run
changes nothing. Needs only the standard library (it does not import spkv).
Run: .venv/bin/python scripts/update_readme.py
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# docs/results.md blocks: name -> (markdown written by the run, its JSON)
BLOCKS = {
    "train": ("results/train/nll_sweep.md", "results/train/nll_sweep.json"),
    "train_gemma3": ("results/train/gemma3/nll-2k/nll_sweep.md", "results/train/gemma3/nll-2k/nll_sweep.json"),
    **{f"train_gemma3_long_{n}": (f"results/train/gemma3/long-nll-{n}/nll_sweep.md", f"results/train/gemma3/long-nll-{n}/nll_sweep.json")
       for n in ("8k", "2k")},
    "nll_gemma3_wg_8k": ("results/lkv/gemma3-wg-nll-8k/nll_sweep.md", "results/lkv/gemma3-wg-nll-8k/nll_sweep.json"),
    "train_options": ("results/train/options.md", "results/train/options.json"),
    "train_smollm2_1.3m": ("results/train/long/reg25-x8/nll_sweep.md", "results/train/long/reg25-x8/nll_sweep.json"),
    "matched_1.3m": ("results/eval/smollm2-1.3m/matched.md", "results/eval/smollm2-1.3m/matched.json"),
    "matched": ("results/eval/smollm2/matched.md", "results/eval/smollm2/matched.json"),
    "matched_frozen": ("results/eval/smollm2-frozen/matched.md", "results/eval/smollm2-frozen/matched.json"),
    "analysis": ("results/analysis/smollm2/analysis.md", "results/analysis/smollm2/analysis.json"),
    "hybrids": ("results/hybrid/smollm2/hybrids.md", "results/hybrid/smollm2/hybrids.json"),
    "hybrids_gemma3": ("results/hybrid/gemma3/compare.md", "results/hybrid/gemma3/compare.json"),
    "tasks": ("results/tasks/gemma3/tasks.md", "results/tasks/gemma3/tasks.json"),
    "tasks_spkv": ("results/tasks/gemma3-spkv/tasks.md", "results/tasks/gemma3-spkv/tasks.json"),
    "tasks_gemma3_long": ("results/tasks/compare-long/compare.md", "results/tasks/compare-long/compare.json"),
    "tasks_gemma3_8": ("results/tasks/compare-8/compare.md", "results/tasks/compare-8/compare.json"),
    "tasks_gemma3_learned": ("results/tasks/compare-learned/compare.md", "results/tasks/compare-learned/compare.json"),
    "core": ("results/core/core_report.md", "results/core/core_report.json"),
    "decode": ("results/bench/decode.md", "results/bench/decode.json"),
    "decode_gemma3": ("results/bench/gemma3/decode.md", "results/bench/gemma3/decode.json"),
    "decode_hybrid": ("results/bench/hybrid/decode.md", "results/bench/hybrid/decode.json"),
    **{name: (f"results/bench/decode_steps/{name}.md", f"results/bench/decode_steps/{name}.json")
       for name in ("decode_steps_16k_b16", "decode_steps_16k", "decode_steps_16k_before")},
    "prefill": ("results/bench/prefill.md", "results/bench/prefill.json"),
    "prefill_lkv": ("results/bench/lkv/prefill.md", "results/bench/lkv/prefill.json"),
    "lkv_scorer": ("results/bench/lkv_scorer/prefill.md", "results/bench/lkv_scorer/prefill.json"),
    "train_step": ("results/bench/train.md", "results/bench/train.json"),
}

# Decode runs whose `spkv-adapter` rows used an adapter that is no longer shipped (commit prefixes of
# their provenance). Those rows are left out of the tables; a new `bash scripts/bench.sh` run has
# another commit, so its rows (made with the shipped adapter) are shown again.
STALE_ADAPTER_DECODE = {"2c9247e0acb2": "the adapter shipped until commit `f763f00` (now `adapters/smollm2-135m-spkv-164k`)"}

SHIPPED_1_3M = ("`runs/long/reg25-x8/adapter` and `runs/long/control-x8/adapter` are shipped as "
                "`adapters/smollm2-135m-spkv-1.3m` and `adapters/smollm2-135m-control-1.3m` (`scripts/train_smollm2.sh` copies them).")

# A note appended to a block, for what its table names but the repository does not hold.
BLOCK_NOTES = {
    "train_smollm2_1.3m": "`runs/` is not in the repository; " + SHIPPED_1_3M,
    "train_options": (
        "Paths under `runs/` are training runs on the machine that made them; `runs/` is not in the repository. "
        "`runs/long/control-x2/adapter` is shipped as `adapters/smollm2-135m-control`; " + SHIPPED_1_3M + " "
        "`runs/options/control-fp32` is not shipped: its config and log are in `results/train/options/control-fp32/`, and "
        "`scripts/train_options_smollm2.sh` trains it again."),
}

MATCHED = "results/eval/smollm2/matched.json"
DECODE = "results/bench/decode.json"
HEADLINE_DENSITY = "density-25"  # the decode rows of the headline: SP-KV's cache at a forced 25% density
HEADLINE_DECODE = [(1024, 1), (16384, 8), (32768, 1), (32768, 8)]  # (context, batch) of the speed rows
HEADLINE_MEMORY = (32768, 8)  # (context, batch) of the memory row
MIB = 2**20


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load(rel: str) -> dict[str, Any]:
    path = ROOT / rel
    return json.loads(path.read_text()) if path.exists() else {}


def link(rel: str, target: Path) -> str:
    """`rel` (from the repository root) as a markdown link that works from `target`'s folder."""
    return f"[`{rel}`]({os.path.relpath(ROOT / rel, target.parent)})"


def source_line(js: str, target: Path) -> str:
    prov = load(js).get("provenance", {})
    line = f"Source: {link(js, target)}"
    if prov:
        line += f" — `{prov.get('command', '?')}` at commit `{str(prov.get('commit', '?'))[:12]}`, {prov.get('date', '?')}"
    return line


def stale_adapter_note(js: str) -> str | None:
    commit = str(load(js).get("provenance", {}).get("commit", ""))[:12]
    return STALE_ADAPTER_DECODE.get(commit)


def md_block(name: str, target: Path) -> str:
    md_rel, js = BLOCKS[name]
    md = ROOT / md_rel
    if not md.exists():
        return f"_No result yet: `{md_rel}` has not been produced._"
    body = re.sub(r"^#+ (.*)$", r"**\1**", md.read_text().strip(), flags=re.M)  # keep the page's own headings on top
    if name == "decode" and (why := stale_adapter_note(js)):
        kept = [line for line in body.splitlines() if not line.startswith("| spkv-adapter |")]
        body = "\n".join(kept) + (
            f"\n\nThe `spkv-adapter` rows of this run are left out: they were measured with {why}, not the shipped "
            "adapter. `PARTS=decode bash scripts/bench.sh` regenerates them with the shipped adapter.")
    if name in BLOCK_NOTES:
        body += "\n\n" + BLOCK_NOTES[name]
    return body + "\n\n" + source_line(js, target)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _dnll(row: dict[str, Any]) -> str:
    return f"{row['dnll_pct']:+.2f}% ± {row['dnll_pct_stderr']:.2f}"


def headline_block(target: Path) -> str:
    matched, decode = load(MATCHED), load(DECODE)
    if not matched or not decode:
        return f"_No result yet: `{MATCHED}` or `{DECODE}` has not been produced._"
    rows = {r["method"]: r for r in matched["rows"]}
    spkv = rows["SP-KV"]
    # the post-hoc baselines calibrated to SP-KV's density (learned rows carry a knob: tau or r)
    baselines = [r for r in matched["rows"] if r.get("calibration") and not r.get("knob")]
    best = min(baselines, key=lambda r: r["dnll_pct"])
    setting = (f"{matched['model']}, {matched['seq_len']} tokens, {matched['sequences']} held-out documents; "
               f"SP-KV at tau {spkv['threshold']:g}, density {_pct(spkv['density'])}")
    lines = [
        "| measure | setting | SP-KV | compared with | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| held-out NLL increase over the dense control (dNLL%, ± paired s.e.) | {setting} | {_dnll(spkv)} | "
        f"{best['method']}, the best of {len(baselines)} post-hoc baselines calibrated to SP-KV's density "
        f"({_pct(best['density'])}): {_dnll(best)} | |",
    ]
    by_key = {(r["cache"], r["context"], r["batch"]): r for r in decode["rows"] if r.get("status", "").startswith("ok")}
    ctx, batch = HEADLINE_MEMORY
    sp, st = by_key.get((HEADLINE_DENSITY, ctx, batch)), by_key.get(("static", ctx, batch))
    if sp and st:
        lines.append(f"| KV cache held (MiB) | {decode['model']['name']} ({decode['model']['dtype']}), context {ctx}, batch {batch}, "
                     f"density {_pct(sp['density'])} | {sp['kv_bytes_held'] / MIB:.1f} | static full cache: "
                     f"{st['kv_bytes_held'] / MIB:.1f} | {sp['kv_bytes_held'] / st['kv_bytes_held']:.2f}x the bytes |")
    for ctx, batch in HEADLINE_DECODE:
        sp, st, dy = (by_key.get((c, ctx, batch)) for c in (HEADLINE_DENSITY, "static", "dynamic"))
        if not (sp and st):
            continue
        dynamic = f"; dynamic cache: {dy['step_ms']:.2f}" if dy else ""
        lines.append(f"| decode step (ms) | context {ctx}, batch {batch}, density {_pct(sp['density'])} | "
                     f"{sp['step_ms']:.2f} | static full cache: {st['step_ms']:.2f}{dynamic} | "
                     f"speed-up {sp['speedup_vs_static']:.2f}x |")
    machine = decode.get("provenance", {}).get("machine", {})
    where = f"{decode.get('threads', '?')} torch threads, {machine.get('cpu_count', '?')}-core CPU, {machine.get('memory_gib', '?')} GiB"
    notes = [
        "",
        f"Decode rows ({where}): caches filled with random keys and values through their own update and eviction at a "
        "forced density (synthetic fill), then real decode forwards; \"static full cache\" is a preallocated transformers "
        "StaticCache, the strongest plain baseline. A speed-up below 1 means SP-KV is slower.",
        "",
        source_line(MATCHED, target),
        "",
        source_line(DECODE, target),
    ]
    return "\n".join(lines + notes)


INTERLEAVED = "results/bench/decode_interleaved/decode.json"  # PARTS=decode-interleaved bash scripts/bench.sh


def interleaved_block(target: Path) -> str:
    """Issue 20's table from the interleaved decode benchmark: per (context, batch), each cache's step,
    and measured / ideal and the speed-up over static per repeat (the caches took turns repeat by
    repeat) with the benchmark's own ratio of the medians."""
    r = load(INTERLEAVED)
    if not r:
        return f"_No result yet: run `PARTS=decode-interleaved bash scripts/bench.sh` ({INTERLEAVED})._"
    ok = {(row["cache"], row["context"], row["batch"]): row for row in r["rows"] if row["status"] == "ok"}
    lines = ["| context x batch | cache | ms | window-only ms | static ms | measured / ideal per repeat | of the medians "
             "(target <= 1.1) | vs static per repeat | of the medians (target >= 2.5x at 16k-32k) |", "|" + " --- |" * 9]
    skipped = []
    compressed = [c for c in r["settings"]["caches"] if c.startswith("density-")]
    for context in r["settings"]["contexts"]:
        for batch in r["settings"]["batch_sizes"]:
            w, st = ok.get(("window-only", context, batch)), ok.get(("static", context, batch))
            for cache in compressed:
                d = ok.get((cache, context, batch))
                if not (d and w and st):
                    missing = [c for c, x in ((cache, d), ("window-only", w), ("static", st)) if not x]
                    skipped.append(f"{context // 1024}k x {batch} ({', '.join(missing)} skipped)")
                    continue
                reps = zip(d["step_ms_repeat_means"], w["step_ms_repeat_means"], st["step_ms_repeat_means"])
                per = [(dm / (wm + d["density"] * (sm - wm)), sm / dm) for dm, wm, sm in reps]
                lines.append(f"| {context // 1024}k x {batch} | {cache} | {d['step_ms']:.0f} | {w['step_ms']:.0f} | {st['step_ms']:.0f} | "
                             f"{' '.join(f'{x:.2f}' for x, _ in per)} | **{d['measured_over_ideal']:.2f}** | "
                             f"{' '.join(f'{y:.2f}' for _, y in per)} | **{d['speedup_vs_static']:.2f}** |")
    s = r["settings"]
    lines += ["", f"{s['repeats']} repeats of {s['steps']} steps per cache after {s['warmup']} warmup steps; all caches of a "
              f"(context, batch) filled first ({r['fill']} fill), then taking turns repeat by repeat; ms: the median of the "
              f"repeat means; ideal = window-only + density x (static - window-only); torch threads {r['threads']}."
              + (f" No ratio at {', '.join(sorted(set(skipped)))}: see the statuses in the JSON." if skipped else ""), ""]
    lines.append(source_line(INTERLEAVED, target))
    return "\n".join(lines)


TARGETS: dict[str, dict[str, Callable[[Path], str]]] = {
    "README.md": {"headline": headline_block},
    "docs/results.md": {**{name: (lambda target, name=name: md_block(name, target)) for name in BLOCKS},
                        "decode_interleaved": interleaved_block},
}


def main() -> None:
    for rel, blocks in TARGETS.items():
        path = ROOT / rel
        if not path.exists():
            continue
        text = old = path.read_text()
        for name, make in blocks.items():
            pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
            text = pattern.sub(lambda m, make=make, path=path: m.group(1) + make(path) + "\n" + m.group(2), text)
        if text != old:
            atomic_write_text(path, text)


if __name__ == "__main__":
    main()

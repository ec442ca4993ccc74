"""Issue 4's training options (at equal tokens, plus longer runs), from the result files (never typed by hand).

Reads every results/train/options/NAME/nll_sweep.json written by scripts/train_options_smollm2.sh
(reg25: the 164k-token recipe they compare against) and every results/train/long/NAME/nll_sweep.json
(longer runs with their own control, scripts/train_long_smollm2.sh), and writes results/train/options.md + options.json:
per option, what it changed, its tokens, and at tau 0.5 the density and dNLL% vs the same dense
control with the paired standard error. Run: .venv/bin/python scripts/options_report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spkv.eval.nll import paired_dnll_stderr  # noqa: E402
from spkv.results import atomic_write_text, write_json  # noqa: E402

RECIPE_KEYS = ("train_llm", "predictor_lr_mult", "density_target", "density_weight", "density_ramp_steps", "density_two_sided",
               "distill_weight", "bf16", "lr", "max_tokens")


# the 164k-token recipe that every equal-token option changes one thing against (shipped until the
# 327k-token reg35 run replaced it), with its bf16 dense control
REFERENCE = ROOT / "results/train/options/reg25/nll_sweep.json"


def dnll(spkv: dict, reference: dict) -> tuple[float, float]:
    """dNLL% of SP-KV against a reference row, with the paired standard error over documents."""
    return 100 * (spkv["nll"] - reference["nll"]) / reference["nll"], paired_dnll_stderr([spkv], reference)[0]


def reference_row(sweep: dict) -> dict:
    return next(r for r in sweep["rows"] if r["method"] == sweep["reference"])


def row(name: str, sweep_path: Path, config_path: Path, reference: dict) -> dict:
    """One option at tau 0.5, against its own dense control and against the 164k-token bf16 one."""
    sweep = json.loads(sweep_path.read_text())
    if sweep["doc_ids"] != reference["doc_ids"]:
        raise ValueError(f"{sweep_path} was evaluated on other documents than {REFERENCE}")
    spkv = next(r for r in sweep["rows"] if r["method"] == "SP-KV" and r["threshold"] == 0.5)
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    own, own_se = dnll(spkv, reference_row(sweep))
    vs_164k, vs_164k_se = dnll(spkv, reference_row(reference))
    return {
        "option": name, "recipe": {k: config.get(k) for k in RECIPE_KEYS}, "train_tokens": sweep["train_tokens"],
        "control": sweep["control"], "density": spkv["density"], "dnll_pct": own, "dnll_pct_stderr": own_se,
        "dnll_pct_vs_164k_control": vs_164k, "dnll_pct_vs_164k_control_stderr": vs_164k_se,
        "nll": spkv["nll"], "reference_nll": reference_row(sweep)["nll"], "sweep": str(sweep_path.relative_to(ROOT)),
        "other_taus": [{"tau": r["threshold"], "target_density": r.get("target_density"), "density": r["density"],
                        "dnll_pct": dnll(r, reference_row(sweep))[0]}
                       for r in sweep["rows"] if r["method"] == "SP-KV" and r["threshold"] != 0.5],
    }


def calibrated(other: dict) -> str:
    """' (calibrated to 25%)' for a row whose tau was calibrated to a target density, else ''."""
    target = other.get("target_density")
    return "" if target is None else f" (calibrated to {100 * target:g}%)"


def main() -> None:
    reference = json.loads(REFERENCE.read_text())
    rows = []
    # equal-token options (scripts/train_options_smollm2.sh), then longer runs (scripts/train_long_smollm2.sh)
    for folder in ("options", "long"):
        for sweep in sorted((ROOT / "results/train" / folder).glob("*/nll_sweep.json")):
            rows.append(row(sweep.parent.name, sweep, sweep.parent / "train_config.json", reference))
    lines = [
        "SP-KV training options on SmolLM2-135M, at equal tokens unless the tokens column says otherwise (longer runs "
        "have a dense control trained on the same tokens): held-out NLL at 2k tokens on the same 16 documents, "
        "SP-KV at tau 0.5 against the dense control trained with the same recipe, tokens and precision (the 164k-token bf16 one, "
        "or an fp32 one for runs made on a CPU without native bf16), and against the 164k-token bf16 control. "
        "reg25 is the 164k-token recipe the equal-token options each change one thing against; reg35-x2 is the shipped adapter. "
        "Target: density <= 35% with dNLL <= +1%.",
        "",
        "| option | train LLM | precision | predictor LR x | density target / weight | distill weight | tokens | density "
        "| dNLL% vs its control (± paired s.e.) | its control | dNLL% vs 164k bf16 control | other tau: density, dNLL% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = r["recipe"]
        reg = f"{c['density_target']} / {c['density_weight']}" if c.get("density_target") is not None else "off"
        if c.get("density_two_sided"):
            reg += ", two-sided"
        if c.get("density_ramp_steps"):
            reg += f", ramped over {c['density_ramp_steps']} steps"
        precision = "bf16 autocast" if c.get("bf16") else "fp32"
        others = "; ".join(f"{o['tau']:.3g}{calibrated(o)}: {100 * o['density']:.1f}%, {o['dnll_pct']:+.2f}%" for o in r["other_taus"])
        lines.append(f"| {r['option']} | {c.get('train_llm')} | {precision} | {c.get('predictor_lr_mult')} | {reg} | {c.get('distill_weight')} "
                     f"| {r['train_tokens']} | {100 * r['density']:.1f}% | {r['dnll_pct']:+.2f}% ± {r['dnll_pct_stderr']:.2f} "
                     f"| `{r['control']}` | {r['dnll_pct_vs_164k_control']:+.2f}% ± {r['dnll_pct_vs_164k_control_stderr']:.2f} "
                     f"| {others} |")
    lines += ["", "In the rows trained on 163,840 tokens, `adapters/smollm2-135m-control` is the 164k-token bf16 control, which "
              "that path held until commit f763f00 and which is now `adapters/smollm2-135m-control-164k`; the path now "
              "holds the 327,680-token control of the shipped reg35-x2 adapter."]
    write_json(ROOT / "results/train/options.json", {"rows": rows})
    atomic_write_text(ROOT / "results/train/options.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

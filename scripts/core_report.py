"""Issue-2 report: logit agreement per family (tiny random models) and an 8k-token forward of SmolLM2-135M.

Run: .venv/bin/python scripts/core_report.py [--length 8192]
Writes results/core/core_report.json and .md. Each forward is measured in a fresh subprocess, so the
peak resident memory (ru_maxrss) belongs to that configuration alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def family_diffs() -> list[dict]:
    import torch

    import spkv
    from tests.test_core import randomize_gates
    from tests.tiny_models import FAMILIES, batch, tiny_model

    rows = []
    for family in FAMILIES:
        for left_pad in (0, 7):
            ids, mask = batch(length=64, left_pad=left_pad)
            real = mask.bool()
            base = tiny_model(family)
            with torch.no_grad():
                ref = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
            spkv.convert(base, spkv.SPKVConfig(window=8, threshold=0.0))
            randomize_gates(base)
            row = {"family": family, "left_pad": left_pad}
            with torch.no_grad():
                for name, use_cache in (("hard_tau0_full_sequence", False), ("hard_tau0_cache", True)):
                    out = base(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
                    row[name] = float((out - ref).abs()[real].max())
                for phase in ("soft", "anneal", "hard"):
                    spkv.update_config(base, phase=phase, window=64, threshold=0.9, anneal_alpha=0.5)
                    out = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    row[f"window_ge_len_{phase}"] = float((out - ref).abs()[real].max())
            rows.append(row)
    return rows


def one_forward(mode: str, length: int) -> dict:
    """Runs in a subprocess: load SmolLM2, one no-grad forward of `length` tokens, report time and peak RSS."""
    import torch

    import spkv

    model, _ = spkv.load_model("smollm2-135m")
    if mode != "base":
        spkv.convert(model, spkv.SPKVConfig(phase=mode))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "tokens": length, "seconds": seconds, "tokens_per_s": length / seconds,
            "rss_after_load_mib": rss_loaded, "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_forward(args.one, args.length)))
        return

    from spkv.results import atomic_write_text, provenance, write_json

    diffs = family_diffs()
    forwards = []
    for mode in ("base", "soft", "hard"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--length", str(args.length)],
                             capture_output=True, text=True, check=True)
        forwards.append(json.loads(out.stdout.strip().splitlines()[-1]))
    prov = provenance()
    out_dir = ROOT / "results" / "core"
    write_json(out_dir / "core_report.json", {"logit_max_abs_diff": diffs, "smollm2_forward": forwards, "provenance": prov})
    cols = list(diffs[0])
    lines = ["# Core checks", "", f"Command: `{prov['command']}`  ", f"Commit: `{prov['commit']}`, {prov['date']}, "
             f"torch {prov['machine']['torch']}, {prov['machine']['cpu_count']} cores", "",
             "## Max |logit difference| vs the unconverted model on real tokens (fp32, tiny random models)", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.2e}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in diffs]
    lines += ["", f"## SmolLM2-135M, one {args.length}-token forward (no grad, fp32)", "",
              "| mode | seconds | tokens/s | RSS after load (MiB) | peak RSS (MiB) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {f['mode']} | {f['seconds']:.1f} | {f['tokens_per_s']:.0f} | {f['rss_after_load_mib']:.0f} | {f['peak_rss_mib']:.0f} |"
              for f in forwards]
    atomic_write_text(out_dir / "core_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

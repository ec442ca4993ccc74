"""Diagnostic (issue 17): how far the mask an LKV adapter was trained under is from the rule it deploys
with. Held-out NLL of one adapter on the first DOCS held-out 2k documents, full-sequence forwards:

  soft T=1, soft T=T_end   the training mask (soft top-k) at the first and the last temperature
  eviction (deployed)      the exact causal eviction rule the cache applies
  budget 1                 every pair kept (the base model, for a frozen LLM)

plus how hard the last soft mask is (share of out-of-window pairs with a mask in (0.1, 0.9)). Until
commit 725767c the script also had "hard top-k (sequence)" (each head keeping its top share of the
whole sequence, then the anneal phase's hard part); the anneal phase now blends toward the eviction
rule itself, so that row would repeat "eviction (deployed)".

    OMP_NUM_THREADS=2 .venv/bin/python scripts/lkv_soft_hard_check.py ADAPTER [--docs 4] [--out DIR]

Writes DIR/NAME.json and prints a line per forward (DIR: results/lkv/soft-hard-check)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import spkv
from spkv.adapter import read_adapter_config
from spkv.data.heldout import heldout_set
from spkv.lkv import TokenScorer, soft_topk
from spkv.results import provenance, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--out", default="results/lkv/soft-hard-check")
    args = ap.parse_args()
    model, tok = spkv.load_model("smollm2-135m")
    spkv.load_adapter(model, args.adapter)
    model.eval()
    config = model.spkv_config
    if config.lkv is None:
        sys.exit(f"{args.adapter} is not an LKV adapter")
    data = heldout_set(tok, seq_len=2048, max_sequences=args.docs)
    t_end = float(read_adapter_config(args.adapter)["spkv"]["lkv"]["temperature"])

    soft_band: list[float] = []

    def band(scorer: TokenScorer, inputs: tuple, scores: torch.Tensor) -> None:
        """Share of out-of-window, non-sink pairs whose soft mask is in (0.1, 0.9) (soft phase only)."""
        cfg = scorer.config
        if cfg.phase != "soft":
            return
        s = scores.detach().transpose(1, 2).float()  # [B, Hkv, T]
        t = s.shape[-1]
        far = torch.zeros(t, dtype=torch.bool)
        far[cfg.sinks:t - cfg.window] = True
        mask = far.expand_as(s)
        k = scorer.shares.detach().float().view(1, -1) * far.sum().float()
        m = soft_topk(s, k, mask, cfg.lkv.temperature)[mask]
        soft_band.append(float(((m > 0.1) & (m < 0.9)).float().mean()))

    for module in model.modules():
        if isinstance(module, TokenScorer):
            module.register_forward_hook(band)

    def nll(label: str, **changes) -> dict:
        spkv.update_config(model, **changes)
        soft_band.clear()
        total = 0.0
        with torch.no_grad():
            for ids in tqdm(data.input_ids, desc=label, leave=False):
                logits = model(ids[None], use_cache=False).logits[0, :-1].float()
                total += float(F.cross_entropy(logits, ids[1:]))
        row = {"forward": label, "nll": total / len(data.input_ids)}
        if soft_band:
            row["soft_mask_in_0.1_0.9"] = sum(soft_band) / len(soft_band)
        print(row, flush=True)
        return row

    lkv = config.lkv
    rows = [nll("soft T=1", phase="soft", lkv=lkv.replace(temperature=1.0)),
            nll(f"soft T={t_end:g}", phase="soft", lkv=lkv.replace(temperature=t_end)),
            nll("eviction (deployed)", phase="hard", anneal_alpha=0.0, lkv=lkv),
            nll("budget 1 (keep all)", phase="hard", lkv=lkv.replace(budget=1.0))]
    keep_all = rows[-1]["nll"]
    for row in rows:
        row["dnll_pct_vs_keep_all"] = 100 * (row["nll"] - keep_all) / keep_all
    result = {"adapter": args.adapter, "budget": lkv.budget, "sinks": config.sinks, "seq_len": 2048,
              "doc_ids": data.doc_ids, "rows": rows,
              "provenance": provenance() | {"command": " ".join(["python scripts/lkv_soft_hard_check.py", *sys.argv[1:]]),
                                            "note": "ran beside other jobs on this 2-core machine; NLL is not timed"}}
    write_json(Path(args.out) / f"{Path(args.adapter).name}.json", result)


if __name__ == "__main__":
    main()

"""Paired difference of two rows of an NLL table over its documents: a matched-density table (spkv
eval matched) or an equal-memory hybrid table (spkv hybrid compare).

    .venv/bin/python scripts/paired_rows.py results/eval/smollm2-frozen/matched.json "ROW A" "ROW B" [...]

Each pair of row names after the file gives (dNLL% of A - dNLL% of B, its paired standard error),
in points of dNLL% against the table's reference (the dense control, or the base model for
`--control base`), with spkv.eval.stats.paired_dnll. Prints the pairs and saves them beside the
table as paired_rows.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from spkv.eval.stats import paired_dnll
from spkv.results import write_json


def main() -> None:
    if len(sys.argv) < 4 or len(sys.argv) % 2:
        sys.exit(__doc__)
    path, names = Path(sys.argv[1]), sys.argv[2:]
    table = json.loads(path.read_text())
    hybrid = "label" in table["rows"][0]  # spkv hybrid compare: rows by label, against the first (the control)
    rows = {r["label" if hybrid else "method"]: r for r in table["rows"]}
    missing = [n for n in names if n not in rows]
    if missing:
        sys.exit(f"{path} has no row named {missing}; its rows: {list(rows)}")
    if hybrid:
        reference, key = table["rows"][0], "dnll_pct_vs_control"
    else:
        reference, key = (rows["dense control"] if table.get("control") else rows["base model"]), "dnll_pct"
    name = reference["label" if hybrid else "method"]
    pairs = []
    for a, b in zip(names[::2], names[1::2]):
        _, se = paired_dnll(rows[a]["nll_per_sequence"], rows[b]["nll_per_sequence"], reference["nll"])
        diff = rows[a][key] - rows[b][key]  # both against the same reference
        pairs.append({"a": a, "b": b, "dnll_pct_points": diff, "paired_se": se})
        print(f"{a} - {b}: {diff:+.2f} ± {se:.2f} points of dNLL% vs the {name}")
    write_json(path.parent / "paired_rows.json", {"table": str(path), "pairs": pairs})


if __name__ == "__main__":
    main()

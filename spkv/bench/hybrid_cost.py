"""Does an exported hybrid cost what its bytes cost? Its decode step against the proportional ideal
window-only + (global share) x (full static - window-only), all three measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def global_share(export_dir: str | Path) -> float:
    """The exported layout's share of global units (spkv_hybrid_layout.json, written by the export)."""
    path = Path(export_dir) / "spkv_hybrid_layout.json"
    if not path.is_file():
        raise FileNotFoundError(f"No {path.name} in {export_dir}: pass a folder written by `spkv hybrid export`.")
    return float(json.loads(path.read_text())["global_share"])


def proportional_cost(rows: list[Any], export_dir: str | Path) -> list[dict[str, Any]]:
    """Per (context, batch) where static, window-only and hybrid-export all ran: the ideal step and
    the measured / ideal ratio (target: <= 1.1)."""
    share = global_share(export_dir)
    ok = {(r.cache, r.context, r.batch): r.step_ms for r in rows if r.status == "ok"}
    out = []
    for context, batch in sorted({(r.context, r.batch) for r in rows}):
        static, window, hybrid = (ok.get((c, context, batch)) for c in ("static", "window-only", "hybrid-export"))
        if None in (static, window, hybrid):
            continue
        ideal = window + share * (static - window)
        out.append({"context": context, "batch": batch, "global_share": share, "static_ms": static, "window_only_ms": window,
                    "hybrid_export_ms": hybrid, "ideal_ms": ideal, "measured_over_ideal": hybrid / ideal})
    return out


def proportional_cost_markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["Exported hybrid vs its proportional cost, window-only + share x (static - window-only):", "",
             "| context | batch | global share | static ms | window-only ms | hybrid-export ms | ideal ms | measured / ideal |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['context']} | {e['batch']} | {100 * e['global_share']:.1f}% | {e['static_ms']:.2f} | {e['window_only_ms']:.2f} "
                     f"| {e['hybrid_export_ms']:.2f} | {e['ideal_ms']:.2f} | {e['measured_over_ideal']:.2f} |")
    return "\n".join(lines) + "\n"

"""Does a compressed cache cost what its bytes cost? Each compressed row's decode step against the
proportional ideal window-only + share x (static - window-only), the three measured in the same run
at the same context and batch (share: the measured density of an SP-KV cache, the global share of
an exported hybrid, whose share-0 end is the same plain model with every layer sliding, the
export-sliding row, where it ran). measured / ideal <= 1.1 is the target (issues 18 and 20)."""

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


def add_proportional_cost(rows: list[Any], hybrid_export: str | Path | None) -> None:
    """Set kv_share, ideal_ms and measured_over_ideal on every ok compressed row (DecodeRow) whose
    static and window-only rows ran."""
    ok = {(r.cache, r.context, r.batch): r.step_ms for r in rows if r.status == "ok"}
    for r in rows:
        if r.status != "ok" or r.cache in ("static", "dynamic", "window-only", "export-sliding"):
            continue
        static, window = ok.get(("static", r.context, r.batch)), ok.get(("window-only", r.context, r.batch))
        if r.cache == "hybrid-export":  # like for like: the same plain model with every layer sliding, where run
            window = ok.get(("export-sliding", r.context, r.batch), window)
        share = global_share(hybrid_export) if r.cache == "hybrid-export" else r.density
        if static is None or window is None or share is None:
            continue
        r.kv_share, r.ideal_ms = share, window + share * (static - window)
        r.measured_over_ideal = r.step_ms / r.ideal_ms

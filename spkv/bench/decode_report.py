"""The decode benchmark's files: decode.json (with provenance), decode.md and the two plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spkv.bench.common import _mib, _num
from spkv.bench.decode_estimate import duration
from spkv.bench.machine import GIB, MIB
from spkv.results import atomic_write_text, provenance, pyplot, save_figure, write_json


def decode_markdown(result: dict[str, Any]) -> str:
    m, bw = result["model"], result["bandwidth"]
    lines = [
        f"# Decode benchmark: {m['name']} ({m['dtype']}), {result['settings'].get('fill', 'model')} fill", "",
        f"Bandwidth (copy of {bw['copy_mib']} MiB): {bw['bytes_per_s'] / GIB:.2f} GiB/s; "
        f"weight bytes read per step: {m['weight_bytes_read_per_step'] / MIB:.1f} MiB; "
        f"window {result['settings']['window']}; torch threads {result['threads']}; command: `{result.get('provenance', {}).get('command', '')}`", "",
        *([f"Run time {duration(result['wall_s'])} (estimated beforehand ~{duration(result['estimate']['total_s'])})", ""]
          if "wall_s" in result and "estimate" in result else []),
        "| cache | context | batch | fill | fill s | step ms | tok/s | vs static | vs dynamic | KV held MiB | KV read MiB "
        "| density | predicted ms | measured/predicted | ideal proportional ms | measured/ideal | row peak RSS +MiB "
        "| peak RSS so far MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r.get('fill', '')} | {_num(r.get('fill_s'))} "
            f"| {_num(r['step_ms'])} | {_num(r['tokens_per_s'], '.1f')} "
            f"| {_num(r['speedup_vs_static'])} | {_num(r['speedup_vs_dynamic'])} | {_mib(r['kv_bytes_held'])} "
            f"| {_mib(r['kv_bytes_read'])} | {_num(r['density'], '.3f')} | {_num(r['predicted_ms'])} "
            f"| {_num(r['measured_over_predicted'])} | {_num(r.get('ideal_ms'))} | {_num(r.get('measured_over_ideal'))} "
            f"| {_num(r['row_peak_rss_delta_mib'], '.0f')} "
            f"| {_num(r['rss_peak_so_far_mib'], '.0f')} | {r['status']}{' (beyond model positions)' if r['beyond_model_positions'] else ''} |"
        )
    lines += ["", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(lines)


def plot_decode(result: dict[str, Any], out: Path) -> list[Path]:
    """decode.png (step time vs context) and decode_memory.png (KV bytes held vs context), log-log,
    one line per cache and one panel per batch size."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    batches = result["settings"]["batch_sizes"]
    paths = []
    for key, ylabel, name, scale in (("step_ms", "decode step (ms)", "decode.png", 1.0),
                                     ("kv_bytes_held", "KV bytes held (MiB)", "decode_memory.png", 1 / MIB)):
        fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
        for ax, batch in zip(axes[0], batches):
            for i, cache in enumerate(result["settings"]["caches"]):
                pts = sorted((r["context"], r[key] * scale) for r in rows if r["cache"] == cache and r["batch"] == batch)
                if pts:  # line styles tell apart caches whose points coincide (dynamic and static bytes)
                    ax.plot(*zip(*pts), marker="os^vD<>"[i % 7], linestyle=("-", "--", ":", "-.")[i % 4], label=cache)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{result['model']['name']}, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_decode(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """decode.json (with provenance), decode.md, decode.png and decode_memory.png under `out`."""
    out = Path(out)
    result = {**result, "provenance": result.get("provenance") or provenance()}
    json_path = write_json(out / "decode.json", result)
    md_path = atomic_write_text(out / "decode.md", decode_markdown(result))
    png, mem_png = plot_decode(result, out)
    return {"json": json_path, "md": md_path, "png": png, "memory_png": mem_png}



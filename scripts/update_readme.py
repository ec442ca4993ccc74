"""Regenerate the README's result tables from the result files (never typed by hand).

Each block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md is replaced by
the markdown file BLOCKS[NAME], plus a link to its JSON (which carries command, commit and machine).
Run: .venv/bin/python scripts/update_readme.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spkv.results import atomic_write_text  # noqa: E402

BLOCKS = {
    "train": ("results/train/nll_sweep.md", "results/train/nll_sweep.json"),
    "train_options": ("results/train/options.md", "results/train/options.json"),
    "matched": ("results/eval/smollm2/matched.md", "results/eval/smollm2/matched.json"),
    "analysis": ("results/analysis/smollm2/analysis.md", "results/analysis/smollm2/analysis.json"),
    "tasks": ("results/tasks/gemma3/tasks.md", "results/tasks/gemma3/tasks.json"),
    "tasks_spkv": ("results/tasks/gemma3-spkv/tasks.md", "results/tasks/gemma3-spkv/tasks.json"),
    "core": ("results/core/core_report.md", "results/core/core_report.json"),
    "decode": ("results/bench/decode.md", "results/bench/decode.json"),
    "prefill": ("results/bench/prefill.md", "results/bench/prefill.json"),
    "train_step": ("results/bench/train.md", "results/bench/train.json"),
}


def block(name: str) -> str:
    md, js = (ROOT / p for p in BLOCKS[name])
    if not md.exists():
        return f"_No result yet: `{BLOCKS[name][0]}` has not been produced._"
    prov = json.loads(js.read_text()).get("provenance", {}) if js.exists() else {}
    source = f"Source: [`{BLOCKS[name][1]}`]({BLOCKS[name][1]})"
    if prov:
        source += f" — `{prov.get('command', '?')}` at commit `{str(prov.get('commit', '?'))[:12]}`, {prov.get('date', '?')}"
    body = re.sub(r"^#+ (.*)$", r"**\1**", md.read_text().strip(), flags=re.M)  # keep the README's own headings on top
    return body + "\n\n" + source


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + block(name) + "\n" + m.group(2), text)
    atomic_write_text(readme, text)


if __name__ == "__main__":
    main()

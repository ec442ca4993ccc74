"""Result files: written atomically, each with the command, commit and machine that produced it."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """The one atomic write: `write(tmp)` fills a temporary file in the same folder, which is then
    renamed over `path`, so readers (and a resumed run) never see half a file. The temporary name
    keeps the suffix, for writers that pick the format from it (savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """The folder version: `fill(tmp)` writes every file into a temporary sibling folder, which then
    replaces `path` by renames, so a crash leaves the old folder or the new one, never half of one."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these folders are meant to be shared
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str | Iterable[str]) -> Path:
    """Atomic UTF-8 text; `text` may be one string or an iterable of chunks (streamed, for large files)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines([text] if isinstance(text, str) else text)

    return atomic_write(path, write)


@functools.cache
def git_commit() -> str:
    """The checkout's commit (+ "-dirty"), read once per process: the CLI reads it at start, so a
    long run records the code it started from, not commits made while it ran."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import torch
    import transformers

    mem_gib = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    info = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem_gib,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # platform.processor() says only "x86_64" on Linux; timings depend on the model
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    if hasattr(os, "getloadavg"):  # at write time; above the run's own threads = other jobs shared the CPUs
        info["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance() -> dict[str, Any]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Atomic JSON with a `provenance` block (added unless the data already carries one)."""
    data = {**data, "provenance": data.get("provenance") or provenance()}
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Atomic PNG write."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))


def finish_dnll_plot(fig: Any, ax: Any, result: dict[str, Any], xlabel: str, path: str | os.PathLike) -> Path:
    """The quality-vs-memory plots' shared frame: dNLL% vs the dense control against `xlabel`, a zero
    line, a title naming model, length and documents; saved atomically and closed."""
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dNLL% vs dense control")
    ax.set_title(f"{result['model']}, {result['seq_len']} tokens, {result['sequences']} held-out documents", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    saved = save_figure(fig, path)
    pyplot().close(fig)
    return saved


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class PartialRun:
    """A long run's result file and its partial twin, the one home of "resume an interrupted run".

    `save` writes OUT/NAME.partial.json after every unit of work (a row, a sample), `earlier` reads
    what an interrupted (partial) and a finished run left, newest first, and `finish` writes
    OUT/NAME.json and removes the partial file. Both writes are atomic."""

    def __init__(self, out: str | os.PathLike, name: str) -> None:
        self.partial = Path(out) / f"{name}.partial.json"
        self.final = Path(out) / f"{name}.json"

    def earlier(self) -> list[dict[str, Any]]:
        return [json.loads(f.read_text()) for f in (self.partial, self.final) if f.exists()]

    def save(self, data: dict[str, Any]) -> Path:
        return write_json(self.partial, data)

    def finish(self, data: dict[str, Any]) -> Path:
        path = write_json(self.final, data)
        self.partial.unlink(missing_ok=True)
        return path


def merge_by(runs: list[dict[str, Any]], field: str, key: str) -> dict[str, dict[str, Any]]:
    """Entries of runs[i][field] by entry[key]; an earlier run's entry wins (the newest work first)."""
    merged: dict[str, dict[str, Any]] = {}
    for run in runs:
        for entry in run.get(field, []):
            merged.setdefault(entry[key], entry)
    return merged


def adapter_digest(adapter: str | os.PathLike) -> str:
    """sha256 of an adapter's files: a result row is reused only for the very weights it was measured with."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter.safetensors"):
        digest.update((Path(adapter) / name).read_bytes())
    return digest.hexdigest()

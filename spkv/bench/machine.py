"""Machine measurements every benchmark shares: torch threads, memory bandwidth, process memory,
weight bytes."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

MIB = 2**20
GIB = 2**30


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (shared tensors counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: all of them, except an untied input embedding table
    (a step reads only B of its rows)."""
    total = weight_bytes(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        total -= inp.weight.numel() * inp.weight.element_size()
    return total


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with this many torch intra-op threads (None: unchanged), then restore the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth from a large tensor copy: 2 * bytes / time (a copy reads and writes)."""
    n = mib * MIB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    del src, dst
    median = statistics.median(times)
    return {"bytes_per_s": 2 * n * 4 / median, "copy_mib": mib, "copy_seconds": times, "threads": torch.get_num_threads()}


def rss_peak_mib() -> float:
    """Peak resident memory of this process so far (monotone over the whole run)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / MIB  # kB on Linux, bytes on macOS


def rss_now_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


class RSSSampler:
    """Context manager: samples the current RSS in a thread; `peak_delta_mib` = peak - RSS at entry."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.baseline = self.peak = rss_now_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_now_mib()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __enter__(self) -> RSSSampler:
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        now = rss_now_mib()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def peak_delta_mib(self) -> float | None:
        return None if self.baseline is None else self.peak - self.baseline


"""Memory probes of the bench: resident set (current and sampled peak), read bandwidth, and the
bytes of weights one decode step reads (what the bandwidth bound divides by)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so that the next
    case's peak RSS is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextmanager
def peak_rss(interval: float = 0.02) -> Iterator[Callable[[], int]]:
    """Samples the resident set in a thread; yields a function that returns the peak so far."""
    release_memory()
    peak = [rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())


def memory_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a buffer far larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except an input
    embedding table that is not also the output head (a step reads one row of it)."""
    seen, total = set(), 0
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = None
    head_weight = getattr(head, "weight", None)  # a quantised head (Int4Linear) has packed codes instead
    if embeddings is not None and (head_weight is None or head_weight.data_ptr() != embeddings.weight.data_ptr()):
        skip = embeddings.weight.data_ptr()
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.data_ptr()
        if pointer in seen or pointer == skip:
            continue
        seen.add(pointer)
        total += tensor.nbytes
    return total

"""Run a block of small torch operations on one CPU thread.

Loops of small tensor operations (a greedy coreset step, anomalib's per-position covariance, a 256 px warp)
gain nothing from intra-op threads on a 2-core machine, and OpenMP threads spinning on cores that other work
also uses made them many times slower (PaDiM's Gaussian fit took about twice as long on two threads as on one).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread(active: bool = True):
    previous = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

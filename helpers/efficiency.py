"""Cost of a detector, measured the same way for every method: fit time, inference time, model size and peak memory."""
from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import psutil
import torch

from helpers.detector import Detector

if TYPE_CHECKING:
    import pandas as pd

MB = 2 ** 20


class PeakRSS:
    """Context manager: peak resident memory above the level at entry, sampled by a thread (torch's allocations
    are invisible to tracemalloc)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak_mb = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self._baseline = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mb = (self._peak - self._baseline) / MB


def _gpu_start() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _gpu_peak_mb(start: float) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / MB


def _empty(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()


def _timed(call: Callable[[], object]) -> tuple[float, float, float]:
    """Seconds ``call()`` took, its peak resident memory and (on CUDA) peak GPU memory, in MB."""
    gpu = _gpu_start()
    with PeakRSS() as memory:
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
    return seconds, memory.peak_mb, _gpu_peak_mb(gpu)


def measure(detector_factory: Callable[[Path], Detector], train_paths: Sequence[str | Path],
            test_paths: Sequence[str | Path], warmup: bool = True) -> dict:
    """Fit a fresh detector on ``train_paths``, predict ``test_paths``, and report what it cost.

    ``detector_factory(cache_dir)`` builds an unfitted detector whose feature cache is ``cache_dir``; the
    cache is empty when each timed phase starts, so both times include running the backbone. Memory is the
    peak resident set above its level at the start of the phase (plus, on CUDA, peak allocated GPU memory).
    """
    if not train_paths or not test_paths:
        raise ValueError("measure() needs at least one train and one test image")
    with tempfile.TemporaryDirectory(prefix="efficiency-") as tmp:
        cache = Path(tmp) / "features"
        cache.mkdir()
        if warmup:
            # The first use of a backbone in a process loads its weights and initialises kernels; untimed, so
            # that cost is not charged to whichever method happens to be measured first.
            detector_factory(cache).fit(list(train_paths[:2])).predict(list(test_paths[:1]))
            _empty(cache)
        detector = detector_factory(cache)

        fit_s, fit_peak_mb, fit_gpu_mb = _timed(lambda: detector.fit(list(train_paths)))
        _empty(cache)  # test features must not come from the cache either, even if the sets overlap
        infer_s, infer_peak_mb, infer_gpu_mb = _timed(lambda: detector.predict(list(test_paths)))
        model_bytes = detector.save(Path(tmp) / "model.safetensors").stat().st_size
    return {"fit_s": fit_s, "infer_ms_per_image": 1000 * infer_s / len(test_paths), "model_bytes": model_bytes,
            "fit_peak_mb": fit_peak_mb, "infer_peak_mb": infer_peak_mb,
            "fit_gpu_peak_mb": fit_gpu_mb, "infer_gpu_peak_mb": infer_gpu_mb,
            "n_train": len(train_paths), "n_test": len(test_paths),
            "torch_threads": torch.get_num_threads()}  # CPU times depend on it as much as on the method


def measure_method(run, method: str) -> "pd.DataFrame":
    """:func:`measure` of the configured detector on each of ``efficiency.categories`` (first data draw, first
    model seed): one row per category."""
    import pandas as pd

    from helpers import experiments, registry

    cfg = run.config
    config, draw = registry.configured(cfg, method), cfg.data.draws[0]
    rows = []
    for category in cfg.efficiency.categories or cfg.data.categories[:1]:
        train = experiments.train_paths(run, draw, category)
        test = list(experiments.rows_of(run, draw, category, "test")["image_path"])
        measured = measure(lambda cache_dir: config.build(cache_dir=cache_dir), train, test)
        rows.append({"method": method, "category": category, **measured})
    return pd.DataFrame(rows)

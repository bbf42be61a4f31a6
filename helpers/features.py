"""Backbone features of images, computed once per image and cached on disk under a key of everything that
changes them: the backbone, the input size and the image's bytes.

One file per image (``<cache>/<backbone>-<size>/<sha1 of the image>.safetensors``) holds every stage a
patch-level method uses, so any subset of images (a split drawn with another seed, the N normals of a
threshold budget, the pooled categories of the unified model) is read back without running the backbone
again, and editing an image can never return a stale entry. Files are written aside and renamed; a file
that cannot be read is logged, discarded and recomputed.
"""
from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import backbones
from helpers.data import load_image
from helpers.paths import CACHE, atomic_write

log = logging.getLogger(__name__)


@lru_cache(maxsize=200_000)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes, remembered for as long as its size and modification time stay the same."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def image_batch(paths: Sequence[str | Path], image_size: int) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` RGB tensor of the images, resized to the model's input size."""
    arrays = [load_image(p, size=image_size) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def compute(paths: Sequence[str | Path], backbone: str, image_size: int, stages: Sequence[str],
            device: str = "auto", batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the backbone over the images (no cache); float32 CPU tensors ``(N, C, h, w)`` per stage."""
    stages = backbones.check_stages(backbone, stages)
    dev = backbones.resolve_device(device)
    net = backbones.load(backbone, str(dev))
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    starts = range(0, len(paths), batch_size)
    for start in tqdm(starts, desc=f"{backbone} features", disable=not progress, leave=False):
        batch = image_batch(paths[start:start + batch_size], image_size).to(dev)
        n = len(batch)
        # Every batch is run at full size (the last one padded with copies of its last image): oneDNN picks
        # other kernels for other batch sizes at small inputs (at 64 px a lone image differed by 2e-5), and an
        # image's cached features must not depend on which images it happened to be computed with.
        if n < batch_size:
            batch = torch.cat([batch, batch[-1:].expand(batch_size - n, -1, -1, -1)])
        out = backbones.forward_stages(net, backbone, backbones.normalise(batch, backbone))
        for s in stages:
            chunks[s].append(out[s][:n].float().cpu())
    return {s: torch.cat(chunks[s]) for s in stages}


FEATURES_VERSION = 2  # bumped when the computed features change (2: batch norms folded into convolutions)


def cache_folder(backbone: str, image_size: int, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or CACHE / "features") / f"{backbone}-{int(image_size)}-v{FEATURES_VERSION}"


def entry(path: str | Path, backbone: str, image_size: int, cache_dir: str | Path | None = None) -> Path:
    """The cache file of one image's features (present or not)."""
    return cache_folder(backbone, image_size, cache_dir) / f"{file_digest(path)}.safetensors"


def cached(path: str | Path, backbone: str, image_size: int, stages: Sequence[str],
           cache_dir: str | Path | None = None) -> bool:
    """Whether the cache holds every one of ``stages`` for one image, from the file's header alone; False for
    an absent or unreadable file (which ``extract`` then discards and recomputes)."""
    from safetensors import safe_open

    file = entry(path, backbone, image_size, cache_dir)
    if not file.is_file():
        return False
    try:
        with safe_open(str(file), framework="pt") as f:
            return set(stages) <= set(f.keys())
    except Exception:  # noqa: BLE001 - any unreadable entry counts as absent
        return False


def _read(path: Path, stages: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The stages of one cached image, or None when the file is absent, lacks a stage or cannot be read (then
    it is removed, so it is recomputed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if not set(stages) <= set(f.keys()):
                return None
            return {s: f.get_tensor(s) for s in stages}
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is discarded and recomputed
        log.warning("feature cache entry %s cannot be read (%s): discarded, recomputing", path, exc)
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({s: t.contiguous() for s, t in tensors.items()}, str(tmp)))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete ``.*.tmp`` files a killed run left in a cache folder (never those of a live process)."""
    removed = 0
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def extract(paths: Sequence[str | Path], backbone: str, image_size: int, stages: Sequence[str],
            device: str = "auto", cache_dir: str | Path | None = None, batch_size: int = 16,
            progress: bool = False) -> dict[str, torch.Tensor]:
    """Features ``{stage: (N, C, h, w)}`` of ``paths`` (in order), read from the cache or computed and cached.

    One backbone pass fills every patch stage of the backbone (and any other stage asked for), so PatchCore and
    PaDiM never run the backbone twice over the same images.
    """
    if len(paths) == 0:
        raise ValueError("extract() got an empty list of images")
    stages = backbones.check_stages(backbone, stages)
    folder = cache_folder(backbone, image_size, cache_dir)
    files = [entry(p, backbone, image_size, cache_dir) for p in paths]
    found = [_read(f, stages) for f in files]
    missing = [i for i, stored in enumerate(found) if stored is None]
    if missing:
        remove_stale_temporaries(folder)
        wanted = list(dict.fromkeys([*backbones.spec(backbone).patch_stages, *stages]))
        for start in range(0, len(missing), 256):  # bounds memory on large sets
            chunk = missing[start:start + 256]
            fresh = compute([paths[i] for i in chunk], backbone, image_size, wanted, device, batch_size, progress)
            for j, i in enumerate(chunk):
                per_image = {s: fresh[s][j].clone() for s in wanted}
                _write(files[i], per_image)
                found[i] = {s: per_image[s] for s in stages}
    return {s: torch.stack([stored[s] for stored in found]) for s in stages}

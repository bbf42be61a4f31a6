"""Backbone features of an image set, computed once and cached on disk under a key of everything that changes them.

The key is built from the backbone, the input size and the bytes of every image (so editing, adding or
reordering images can never return a stale entry); each stage is one ``.npy`` file, so a later request for
another stage of the same set adds a file instead of recomputing the rest.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import backbones
from helpers.data import load_image
from helpers.paths import CACHE, atomic_write, cache_key


def file_digest(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


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
        out = backbones.forward_stages(net, backbone, backbones.normalise(batch, backbone))
        for s in stages:
            chunks[s].append(out[s].float().cpu())
    return {s: torch.cat(chunks[s]) for s in stages}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save given a name would append ".npy" to the temporary one
        np.save(f, array)


def set_key(paths: Sequence[str | Path], backbone: str, image_size: int) -> str:
    return cache_key(kind="features", backbone=backbone, image_size=image_size,
                     files=[file_digest(p) for p in paths])


def extract(paths: Sequence[str | Path], backbone: str, image_size: int, stages: Sequence[str],
            device: str = "auto", cache_dir: str | Path | None = None, batch_size: int = 16,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of ``paths`` for ``stages``, read from the cache or computed and written to it."""
    if len(paths) == 0:
        raise ValueError("extract() got an empty list of images")
    stages = backbones.check_stages(backbone, stages)
    folder = Path(cache_dir or CACHE / "features") / set_key(paths, backbone, image_size)
    missing = [s for s in stages if not (folder / f"{s}.npy").is_file()]
    if missing:
        # One backbone pass also fills every other stage a method uses by default, so PatchCore and PaDiM
        # never run the backbone twice over the same images.
        shared = {st for method_stages in backbones.DEFAULT_STAGES.get(backbone, {}).values() for st in method_stages}
        wanted = missing + sorted(st for st in shared if st not in missing and not (folder / f"{st}.npy").is_file())
        fresh = compute(paths, backbone, image_size, wanted, device, batch_size, progress)
        for stage, tensor in fresh.items():  # parallel jobs may fill the same set
            atomic_write(folder / f"{stage}.npy", lambda tmp: _save_npy(tmp, tensor.numpy()))
    return {s: torch.from_numpy(np.load(folder / f"{s}.npy")) for s in stages}

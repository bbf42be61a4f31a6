"""The unified study's positive control: cross-category anomalies. For every ordered pair of categories (A, B) a
square of one of B's normal images is pasted, at the same place, into one of A's normal images, so the anomaly is
B's normal appearance where A's should be. A model of A alone must flag it; a model of the pooled normals of A and
B has seen that appearance and can explain it away.

Written in MVTec AD layout with exact masks (``<A>/test/from_<B>/NNN.png``, ``<A>/ground_truth/from_<B>/NNN_mask.png``,
and A's normal images, copied byte for byte, as ``<A>/test/good``), with a split manifest (``manifest.csv``, every
row in the ``test`` split) and a stamp (``control.json``) of everything the files were made from.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "manifest.csv"
STAMP = "control.json"
PREFIX = "from_"  # defect folder of the anomalies made with a patch of category B: from_<B>
# Positions tried per image; the one where B's square differs most from A's is kept, so a patch of one dark
# background pasted onto another (a nut onto a nut) does not make an "anomaly" nobody could see.
CANDIDATE_POSITIONS = 8


def defect_name(source: str) -> str:
    return f"{PREFIX}{source}"


def source_of(defect_type: str) -> str | None:
    """The category whose patch made an anomaly of this defect type; None for ``good``."""
    return defect_type[len(PREFIX):] if defect_type.startswith(PREFIX) else None


def pair_rng(seed: int, target: str, source: str, index: int) -> np.random.Generator:
    """The random stream of one anomaly, so a file never depends on which other pairs were made."""
    key = [int(seed), zlib.crc32(target.encode()), zlib.crc32(source.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def paste_patch(base: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
                patch: float) -> tuple[np.ndarray, np.ndarray]:
    """``base`` with a square of ``donor`` (same size, uint8 RGB) copied in at the same place, and its mask.

    The square's side is ``patch`` of the shorter image side (1: the whole of a square image is B's); of
    CANDIDATE_POSITIONS random positions the one whose square differs most between the two images is used."""
    if base.shape != donor.shape:
        raise ValueError(f"base {base.shape} and donor {donor.shape} must have the same shape")
    if not 0 < patch <= 1:
        raise ValueError(f"patch must lie in (0, 1], got {patch}")
    height, width = base.shape[:2]
    side = max(1, int(round(patch * min(height, width))))
    tops = rng.integers(0, height - side + 1, CANDIDATE_POSITIONS)
    lefts = rng.integers(0, width - side + 1, CANDIDATE_POSITIONS)
    difference = [np.abs(base[t:t + side, x:x + side].astype(np.int16) - donor[t:t + side, x:x + side]).mean()
                  for t, x in zip(tops, lefts)]
    best = int(np.argmax(difference))
    top, left = int(tops[best]), int(lefts[best])
    image = base.copy()
    image[top:top + side, left:left + side] = donor[top:top + side, left:left + side]
    mask = np.zeros((height, width), bool)
    mask[top:top + side, left:left + side] = True
    return image, mask


def _rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    from helpers.data import load_image

    image = load_image(path)
    if size is not None and image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return image


def stamp(goods: Mapping[str, Sequence[Path]], donors: Mapping[str, Sequence[Path]], per_pair: int, patch: float,
          seed: int) -> dict:
    """What a control folder is made from: its parameters and the bytes of every source image."""
    from helpers.features import file_digest

    def digests(images: Mapping[str, Sequence[Path]]) -> dict:
        return {c: [file_digest(p) for p in paths] for c, paths in sorted(images.items())}

    return {"per_pair": int(per_pair), "patch": float(patch), "seed": int(seed), "goods": digests(goods),
            "donors": digests(donors), "generator": "data_prep.cross_category"}


def read_stamp(out: str | Path) -> dict | None:
    path = Path(out) / STAMP
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def build(out: str | Path, goods: Mapping[str, Sequence[Path]], donors: Mapping[str, Sequence[Path]],
          per_pair: int, patch: float, seed: int = 0) -> Path:
    """Write the control for every ordered pair of the categories in ``goods`` into ``out``; return ``out``.

    ``goods[A]`` are A's normal images (the bases, and copied as A's ``good`` test images); ``donors[B]`` are the
    normal images B's squares are cut from. A folder whose stamp already matches is kept as it is; any other is
    replaced whole: everything is written aside and renamed into place."""
    import pandas as pd

    out = Path(out)
    categories = list(goods)
    missing = [c for c in categories if not goods[c] or not donors.get(c)]
    if len(categories) < 2 or missing:
        raise ValueError(f"the control needs two or more categories, each with normal images to paste into and "
                         f"to cut from; missing for {missing or categories}")
    if int(per_pair) < 1:
        raise ValueError(f"per_pair must be at least 1, got {per_pair}")
    wanted = stamp(goods, donors, per_pair, patch, seed)
    if read_stamp(out) == wanted:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-{os.getpid()}-", dir=out.parent))
    try:
        rows = []
        for target in categories:
            good_dir = staging / target / "test" / "good"
            good_dir.mkdir(parents=True)
            names = []
            for index, path in enumerate(goods[target]):
                name = f"{index:03d}{Path(path).suffix.lower()}"
                shutil.copyfile(path, good_dir / name)  # byte for byte: the feature cache already knows it
                names.append(name)
                rows.append({"category": target, "split": "test", "label": 0, "defect_type": "good",
                             "image": f"{target}/test/good/{name}", "mask": ""})
            for source in categories:
                if source == target:
                    continue
                defect = defect_name(source)
                image_dir, mask_dir = staging / target / "test" / defect, staging / target / "ground_truth" / defect
                image_dir.mkdir(parents=True)
                mask_dir.mkdir(parents=True)
                for index in range(int(per_pair)):
                    rng = pair_rng(seed, target, source, index)
                    base = _rgb(goods[target][int(rng.integers(len(goods[target])))])
                    donor = _rgb(donors[source][int(rng.integers(len(donors[source])))], base.shape[:2])
                    image, mask = paste_patch(base, donor, rng, patch)
                    stem = f"{index:03d}"
                    Image.fromarray(image).save(image_dir / f"{stem}.png", compress_level=1)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{stem}_mask.png", compress_level=1)
                    rows.append({"category": target, "split": "test", "label": 1, "defect_type": defect,
                                 "image": f"{target}/test/{defect}/{stem}.png",
                                 "mask": f"{target}/ground_truth/{defect}/{stem}_mask.png"})
        pd.DataFrame(rows).to_csv(staging / MANIFEST, index=False)
        (staging / STAMP).write_text(json.dumps(wanted, sort_keys=True) + "\n")
        old = staging.with_name(staging.name + "-replaced")
        if out.exists():
            os.replace(out, old)  # aside first (fast), so the rename below never meets a half-deleted folder
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of ``out`` that a killed build left behind (its process is gone)."""
    for folder in out.parent.glob(f".{out.name}-staging-*"):
        pid = folder.name[len(f".{out.name}-staging-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def load_manifest(out: str | Path) -> "pd.DataFrame":
    """The control's split manifest (helpers.splits columns, every row in the ``test`` split)."""
    from helpers import splits

    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the positive control has not been built "
                                f"(helpers.unified.ensure_control)")
    return splits.load(path)

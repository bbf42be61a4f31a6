"""MVTec-Shift: copies of an MVTec-layout dataset under controlled lighting, optics and pose shifts (as MVTec AD 2)."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from helpers.data import DatasetError, Sample, list_categories, list_samples, load_image, load_mask, mask_path_for
from helpers.paths import write_csv
from helpers.threads import one_torch_thread

SEVERITIES = (0, 1, 2, 3, 4, 5)
MANIFEST = "shift_manifest.csv"
MANIFEST_COLUMNS = ["category", "split", "defect_type", "image", "transform", "severity", "seed",
                    "label_before", "label_after", "params"]
# Pixel quantities (blur sigma) are given for a 256 px side and scale with the image, so a severity means the
# same visual change whatever the source resolution.
REFERENCE_SIDE = 256

# One row per transform: what the severity sets, its value at severities 1..5, and what is drawn per image.
# Severity 0 is always the exact identity. Geometric transforms fill uncovered border with the image's mean
# colour (less conspicuous to a detector than black); those pixels are never defects and `valid` is False there.
SEVERITY_TABLE: dict[str, dict[Any, Any]] = {
    "brightness": {"kind": "photometric", "parameter": "gain change v (gain 1 +/- v)",
                   1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, "drawn per image": "sign (brighter or darker)"},
    "contrast": {"kind": "photometric", "parameter": "contrast change v (factor 1 +/- v about the mean grey)",
                 1: 0.15, 2: 0.3, 3: 0.45, 4: 0.6, 5: 0.75, "drawn per image": "sign (more or less contrast)"},
    "gamma": {"kind": "photometric", "parameter": "gamma (or 1/gamma)",
              1: 1.15, 2: 1.3, 3: 1.5, 4: 1.75, 5: 2.0, "drawn per image": "direction (gamma or 1/gamma)"},
    "color_temperature": {"kind": "photometric", "parameter": "R and B gain change (R x (1+s), B x (1-s))",
                          1: 0.05, 2: 0.1, 3: 0.15, 4: 0.2, 5: 0.25, "drawn per image": "sign (warmer or cooler)"},
    "blur": {"kind": "photometric", "parameter": "Gaussian sigma, px at 256 px side",
             1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, "drawn per image": "nothing"},
    "noise": {"kind": "photometric", "parameter": "Gaussian noise std, grey levels",
              1: 5.0, 2: 10.0, 3: 15.0, 4: 20.0, 5: 25.0, "drawn per image": "noise seed"},
    "gradient": {"kind": "photometric", "parameter": "illumination gain swing a (gain 1-a .. 1+a across the image)",
                 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, "drawn per image": "ramp angle"},
    "spotlight": {"kind": "photometric", "parameter": "peak gain change of the spot",
                  1: 0.15, 2: 0.3, 3: 0.45, 4: 0.6, 5: 0.75,
                  "drawn per image": "centre, radius (0.15-0.35 of side), bright or dark"},
    "rotation": {"kind": "geometric", "parameter": "rotation angle, degrees",
                 1: 2.0, 2: 5.0, 3: 10.0, 4: 15.0, 5: 20.0, "drawn per image": "sign"},
    "translation": {"kind": "geometric", "parameter": "shift, fraction of side",
                    1: 0.02, 2: 0.05, 3: 0.08, 4: 0.12, 5: 0.16, "drawn per image": "direction"},
    "scale": {"kind": "geometric", "parameter": "zoom change v (scale 1 +/- v)",
              1: 0.05, 2: 0.1, 3: 0.15, 4: 0.2, 5: 0.3, "drawn per image": "zoom in or out"},
    "perspective": {"kind": "geometric", "parameter": "max corner displacement, fraction of side",
                    1: 0.02, 2: 0.04, 3: 0.07, 4: 0.1, 5: 0.14, "drawn per image": "each corner's offset"},
    "mixed": {"kind": "mixed", "parameter": "transforms composed per image, each at this severity",
              1: "2-3", 2: "2-3", 3: "2-3", 4: "2-3", 5: "2-3",
              "drawn per image": "which transforms, then their own draws"},
}


def severity_table_markdown() -> str:
    """The severity table as Markdown, with the conventions every shifted dataset follows."""
    lines = ["| transform | kind | parameter | 1 | 2 | 3 | 4 | 5 | drawn per image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in SEVERITY_TABLE.items():
        values = " | ".join(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in range(1, 6))
        lines.append(f"| {name} | {row['kind']} | {row['parameter']} | {values} | {row['drawn per image']} |")
    lines += ["", "Severity 0 is the exact identity. Geometric transforms fill uncovered border with the image's "
              "mean colour; those pixels are never defects and are False in `valid`. Pixel sizes scale with the "
              f"image side (given at {REFERENCE_SIDE} px). `mixed` composes geometric, then lighting, then blur, "
              "then noise (pose, scene light, optics, sensor)."]
    return "\n".join(lines)


def _value(name: str, severity: int) -> float:
    return SEVERITY_TABLE[name][severity]


def _round(x: float) -> float:
    # draws are rounded before use, so the manifest stays readable and still replays exactly
    return round(float(x), 4)


def _sign(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


# --- photometric: numpy on float32 images in [0, 255]; each clips, as a saturated sensor would ---------------

def _brightness(img, p):
    return np.clip(img * p["gain"], 0, 255)


def _contrast(img, p):
    grey = img.mean()  # one scalar for all channels, so contrast does not shift the colour balance
    return np.clip(grey + p["factor"] * (img - grey), 0, 255)


def _gamma(img, p):
    return 255.0 * (img / 255.0) ** p["gamma"]


def _color_temperature(img, p):
    gains = np.array([p["red_gain"], 1.0, p["blue_gain"]], np.float32)
    return np.clip(img * gains, 0, 255)


def _blur(img, p):
    return gaussian_filter(img, sigma=(p["sigma_px"], p["sigma_px"], 0), mode="reflect")


def _noise(img, p):
    noise = np.random.default_rng(p["noise_seed"]).normal(0.0, p["std"], img.shape).astype(np.float32)
    return np.clip(img + noise, 0, 255)


def _grid(shape):
    """Pixel coordinates relative to the image centre, in pixels."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy - (h - 1) / 2, xx - (w - 1) / 2


def _gradient(img, p):
    yy, xx = _grid(img.shape[:2])
    theta = np.deg2rad(p["angle_deg"])
    ramp = xx * np.cos(theta) + yy * np.sin(theta)
    ramp /= max(np.abs(ramp).max(), 1e-6)  # -1 .. 1 across the image whatever the angle
    return np.clip(img * (1 + p["swing"] * ramp)[..., None], 0, 255)


def _spotlight(img, p):
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = (xx - p["cx"] * (w - 1)) ** 2 + (yy - p["cy"] * (h - 1)) ** 2
    sigma = p["radius"] * min(h, w)
    spot = np.exp(-r2 / (2 * sigma**2))
    return np.clip(img * (1 + p["peak"] * spot)[..., None], 0, 255)


# --- geometric: torchvision v2 functional; the same call moves image (bilinear) and mask (nearest) -----------

def _rotate(x, p, **kw):
    return F.rotate(x, angle=p["angle_deg"], **kw)


def _translate(x, p, **kw):
    return F.affine(x, angle=0.0, translate=[p["dx"], p["dy"]], scale=1.0, shear=[0.0, 0.0], **kw)


def _scale(x, p, **kw):
    return F.affine(x, angle=0.0, translate=[0, 0], scale=p["scale"], shear=[0.0, 0.0], **kw)


def _corners(h, w):
    return [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]


def _perspective(x, p, **kw):
    h, w = x.shape[-2:]
    return F.perspective(x, startpoints=_corners(h, w), endpoints=p["endpoints"], **kw)


def _warp(img, mask, valid, render, p):
    """Move image, mask and valid map together; border that comes into view gets the mean colour and valid=False."""
    fill = [float(v) for v in img.reshape(-1, 3).mean(0)] + [0.0]
    # valid rides along as a fourth channel: after bilinear sampling it is < 1 wherever any tap hit the border
    stack = np.concatenate([img, valid[..., None].astype(np.float32)], axis=2)
    out = render(tv_tensors.Image(torch.from_numpy(stack).permute(2, 0, 1)), p,
                 interpolation=F.InterpolationMode.BILINEAR, fill=fill)
    out = out.permute(1, 2, 0).numpy()
    new_valid = out[..., 3] > 1 - 1e-3
    new_mask = None
    if mask is not None:
        m = render(tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None]), p,
                   interpolation=F.InterpolationMode.NEAREST, fill=0)
        new_mask = m[0].numpy().astype(bool) & new_valid  # uncovered border is never a defect
    return np.clip(out[..., :3], 0, 255), new_mask, new_valid


# --- per-image draws: everything random goes into params, so params alone replay the transform ---------------

def _draw_rotation(v, rng, shape):
    return {"angle_deg": float(_sign(rng) * v)}


def _draw_translation(v, rng, shape):
    h, w = shape
    theta = rng.uniform(0, 2 * np.pi)
    # whole pixels, so a pure translation copies pixel values exactly
    return {"dx": int(round(v * w * np.cos(theta))), "dy": int(round(v * h * np.sin(theta)))}


def _draw_perspective(v, rng, shape):
    h, w = shape
    offsets = rng.uniform(-1, 1, (4, 2)) * v * np.array([w, h])
    return {"endpoints": [[_round(x), _round(y)] for x, y in np.array(_corners(h, w)) + offsets]}


def _draw_color_temperature(v, rng, shape):
    warmer = _sign(rng)
    return {"red_gain": 1 + warmer * v, "blue_gain": 1 - warmer * v}


def _draw_spotlight(v, rng, shape):
    cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.35)
    return {"cx": _round(cx), "cy": _round(cy), "radius": _round(radius), "peak": float(_sign(rng) * v)}


@dataclass(frozen=True)
class Transform:
    kind: str  # "photometric" or "geometric"
    stage: int  # order inside `mixed`: pose (0), scene light (1), optics (2), sensor (3)
    draw: Callable[[float, np.random.Generator, tuple[int, int]], dict]
    render: Callable


TRANSFORMS: dict[str, Transform] = {
    "brightness": Transform("photometric", 1, lambda v, rng, s: {"gain": 1 + _sign(rng) * v}, _brightness),
    "contrast": Transform("photometric", 1, lambda v, rng, s: {"factor": 1 + _sign(rng) * v}, _contrast),
    "gamma": Transform("photometric", 1, lambda v, rng, s: {"gamma": v if _sign(rng) > 0 else _round(1 / v)},
                       _gamma),
    "color_temperature": Transform("photometric", 1, _draw_color_temperature, _color_temperature),
    "blur": Transform("photometric", 2, lambda v, rng, s: {"sigma_px": v * min(s) / REFERENCE_SIDE}, _blur),
    "noise": Transform("photometric", 3, lambda v, rng, s: {"std": v, "noise_seed": int(rng.integers(2**32))},
                       _noise),
    "gradient": Transform("photometric", 1, lambda v, rng, s: {"angle_deg": _round(rng.uniform(0, 360)), "swing": v},
                          _gradient),
    "spotlight": Transform("photometric", 1, _draw_spotlight, _spotlight),
    "rotation": Transform("geometric", 0, _draw_rotation, _rotate),
    "translation": Transform("geometric", 0, _draw_translation, _translate),
    "scale": Transform("geometric", 0, lambda v, rng, s: {"scale": 1 + _sign(rng) * v}, _scale),
    "perspective": Transform("geometric", 0, _draw_perspective, _perspective),
}
TRANSFORM_NAMES = (*TRANSFORMS, "mixed")


def check_transform(transform: str, severity: int) -> None:
    """Raise a ValueError naming the bad parameter and the allowed values."""
    if transform not in TRANSFORM_NAMES:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORM_NAMES)}; got {transform!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 0..5; got {severity!r}")


def _draw(transform: str, severity: int, rng: np.random.Generator, shape) -> dict:
    if transform != "mixed":
        return TRANSFORMS[transform].draw(_value(transform, severity), rng, shape)
    names = list(rng.choice(list(TRANSFORMS), size=int(rng.integers(2, 4)), replace=False))
    names.sort(key=lambda n: TRANSFORMS[n].stage)  # stable: same-stage transforms keep their drawn order
    return {"steps": [{"transform": str(n), "params": _draw(n, severity, rng, shape)} for n in names]}


def _render(transform, params, img, mask, valid):
    if transform == "mixed":
        for step in params["steps"]:
            img, mask, valid = _render(step["transform"], step["params"], img, mask, valid)
        return img, mask, valid
    t = TRANSFORMS[transform]
    if t.kind == "geometric":
        return _warp(img, mask, valid, t.render, params)
    return t.render(img, params).astype(np.float32, copy=False), mask, valid


def _check_inputs(image, mask):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
    if mask is not None and np.shape(mask) != image.shape[:2]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape[:2]}")


def apply_with_params(image: np.ndarray, mask: np.ndarray | None, transform: str, severity: int, params: dict):
    """Re-apply a transform exactly from recorded params; returns ``(image, mask, valid, params)`` as :func:`apply`."""
    check_transform(transform, severity)
    _check_inputs(image, mask)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    valid = np.ones(image.shape[:2], dtype=bool)
    if severity == 0:
        return image.copy(), None if mask is None else mask.copy(), valid, {}
    img, mask, valid = _render(transform, params, image.astype(np.float32), mask, valid)
    return np.rint(img).astype(np.uint8), mask, valid, params


def apply(image: np.ndarray, mask: np.ndarray | None, transform: str, severity: int, rng: np.random.Generator):
    """Shift one image (uint8 RGB) and move its bool mask with it.

    Returns ``(image, mask, valid, params)``: the shifted image, the moved mask (None if ``mask`` is None), where
    pixels come from the original image, and the JSON-serialisable draws that :func:`apply_with_params` replays.
    """
    check_transform(transform, severity)
    _check_inputs(image, mask)
    params = {} if severity == 0 else _draw(transform, severity, rng, image.shape[:2])
    return apply_with_params(image, mask, transform, severity, params)


# --- dataset level -------------------------------------------------------------------------------------------

def sample_rng(seed: int, transform: str, severity: int, key: str) -> np.random.Generator:
    """A generator per image from (seed, transform, severity, relative path): results do not depend on order."""
    digest = hashlib.sha256(f"{seed}|{transform}|{severity}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def family_path(dst_root: str | Path, transform: str, severity: int, seed: int) -> Path:
    """Where one member of a shift family lives: ``<dst_root>/<transform>/severity=<k>/seed=<n>``."""
    return Path(dst_root) / transform / f"severity={severity}" / f"seed={seed}"


def _save_image(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Format follows the source suffix, so file names stay the same; PNG at level 1 writes about four times
    # faster than the default and is lossless all the same.
    options = {"compress_level": 1} if path.suffix.lower() == ".png" else {}
    Image.fromarray(array).save(path, **options)


def _shift_sample(sample: Sample, out: Path, transform: str, severity: int, seed: int) -> dict:
    image_out = out / sample.key
    mask = None if sample.mask_path is None else load_mask(sample.mask_path)
    if severity == 0:
        # a byte copy is the exact identity, also for lossy sources and grey files
        image_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, image_out)
        if sample.mask_path is not None:
            mask_out = mask_path_for(out, sample.category, sample.defect_type, sample.image_path)
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.mask_path, mask_out)
        params = {}
    else:
        image = load_image(sample.image_path)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DatasetError(f"mask {sample.mask_path} is {mask.shape}, its image {sample.image_path} is "
                               f"{image.shape[:2]}")
        rng = sample_rng(seed, transform, severity, sample.key)
        shifted, mask, _, params = apply(image, mask, transform, severity, rng)
        _save_image(shifted, image_out)
        if mask is not None:
            # an emptied mask is still written, so every defect image keeps its mask file
            _save_image(mask.astype(np.uint8) * 255,
                            mask_path_for(out, sample.category, sample.defect_type, sample.image_path))
    # the label follows the mask: a defect moved out of the frame leaves a normal image; without ground
    # truth we cannot tell, so the label stays
    label_after = sample.label if mask is None else int(mask.any())
    return {"category": sample.category, "split": sample.split, "defect_type": sample.defect_type,
            "image": sample.key, "transform": transform, "severity": int(severity), "seed": int(seed),
            "label_before": sample.label, "label_after": label_after, "params": json.dumps(params, sort_keys=True)}


def _check_locations(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ValueError(f"dst {dst} must lie outside src {src} (and not contain it): the source is never modified")


def _resolve_categories(src: Path, categories) -> list[str]:
    known = list_categories(src)
    if categories is None:
        return known
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise DatasetError(f"categories {unknown} not found in {src} (known: {', '.join(known)})")
    return list(categories)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Swap the finished folder in with renames, so dst is never half-written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def shift_dataset(src: str | Path, dst: str | Path, transform: str, severity: int, seed: int,
                  categories: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                  parts: tuple[str, ...] = ("train", "test")) -> Path:
    """Write a shifted MVTec-layout copy of ``src`` at ``dst`` plus its manifest.

    ``parts`` chooses the MVTec folders to shift: a test-only copy serves evaluation; the training images are
    only needed where a model is re-fitted on shifted normals. Per-image draws do not depend on ``parts``.
    """
    check_transform(transform, severity)
    unknown = set(parts) - {"train", "test"}
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('train', 'test'), got {parts}")
    src, dst = Path(src), Path(dst)
    _check_locations(src, dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to rebuild it")
    samples = [s for c in _resolve_categories(src, categories) for s in list_samples(src, c) if s.split in parts]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
    try:
        with one_torch_thread():
            rows = [_shift_sample(s, tmp, transform, severity, seed)
                    for s in tqdm(samples, desc=f"{transform} severity={severity}", unit="img", leave=False,
                                  disable=not progress)]
        write_csv(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), tmp / MANIFEST)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_manifest(root: str | Path) -> pd.DataFrame | None:
    """The shift manifest of a dataset root, or None if the root is not a shifted copy."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    text_columns = {c: str for c in ("category", "split", "defect_type", "image", "transform", "params")}
    return pd.read_csv(path, dtype=text_columns, keep_default_na=False)


def label_overrides(root: str | Path) -> dict[str, int]:
    """Sample key -> label after the shift; empty for a root without a shift manifest."""
    df = read_manifest(root)
    if df is None:
        return {}
    names = df["image"].map(lambda p: Path(p).name)
    keys = df["category"] + "/" + df["split"] + "/" + df["defect_type"] + "/" + names
    return dict(zip(keys, df["label_after"].astype(int)))


def replay_sample(src: str | Path, root: str | Path, key: str):
    """Re-apply the recorded shift of one sample to its source: ``(image, mask, valid, params)``.

    Also the way to get the ``valid`` map of a written image, which is not stored on disk.
    """
    df = read_manifest(root)
    if df is None:
        raise DatasetError(f"{root} has no {MANIFEST}")
    rows = df[df["image"] == key]
    if len(rows) != 1:
        raise DatasetError(f"{key} is not in {Path(root) / MANIFEST}")
    row = rows.iloc[0]
    category, split, defect_type, name = key.split("/")
    image_path = Path(src) / key
    mask = None
    if row["label_before"] == 1 and (Path(src) / category / "ground_truth").is_dir():
        mask = load_mask(mask_path_for(Path(src), category, defect_type, image_path))
    return apply_with_params(load_image(image_path), mask, row["transform"], int(row["severity"]),
                             json.loads(row["params"]))


def _is_complete(dst: Path, transform: str, severity: int, seed: int, categories: list[str]) -> bool:
    df = read_manifest(dst)
    return (df is not None and set(df["transform"]) == {transform} and set(df["severity"]) == {severity}
            and set(df["seed"]) == {seed} and set(df["category"]) == set(categories))


def shift_family(src: str | Path, dst_root: str | Path, transforms: list[str], severities: list[int], seed: int,
                 categories: list[str] | None = None) -> list[Path]:
    """Build every (transform, severity) copy under ``dst_root``; members that already exist complete are kept."""
    for t in transforms:
        for k in severities:
            check_transform(t, k)  # fail before hours of work, not halfway through
    cats = _resolve_categories(Path(src), categories)
    jobs = [(t, k) for t in transforms for k in severities]
    paths = []
    for t, k in tqdm(jobs, desc="shift family", unit="dataset"):
        dst = family_path(dst_root, t, k, seed)
        if dst.exists() and not _is_complete(dst, t, k, seed, cats):
            raise FileExistsError(f"{dst} exists but is not a complete {t} severity={k} seed={seed} copy of "
                                  f"categories {cats}; remove it to rebuild")
        if not dst.exists():
            shift_dataset(src, dst, t, k, seed, categories=cats)
        paths.append(dst)
    return paths


# --- command line --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shift", description=__doc__,
                                epilog="Severity table:\n\n" + severity_table_markdown(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="MVTec-layout dataset root (never modified)")
    p.add_argument("--dst", help="output root for one shifted copy")
    p.add_argument("--transform", help=f"one of: {', '.join(TRANSFORM_NAMES)}")
    p.add_argument("--severity", type=int, help="0 (identity) .. 5")
    p.add_argument("--family", action="store_true", help="build every --transforms x --severities copy")
    p.add_argument("--dst-root", help="family root: <dst-root>/<transform>/severity=<k>/seed=<n>/")
    p.add_argument("--transforms", nargs="+", help="family transforms")
    p.add_argument("--severities", nargs="+", type=int, help="family severities")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--categories", nargs="+", help="default: every category in --src")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.family:
        missing = [f for f, v in (("--dst-root", args.dst_root), ("--transforms", args.transforms),
                                  ("--severities", args.severities)) if not v]
    else:
        missing = [f for f, v in (("--dst", args.dst), ("--transform", args.transform),
                                  ("--severity", args.severity)) if v is None]
    if missing:
        parser.error(f"{'--family' if args.family else 'a single copy'} needs {', '.join(missing)}")
    try:
        if args.family:
            for path in shift_family(args.src, args.dst_root, args.transforms, args.severities, args.seed,
                                     args.categories):
                print(path)
        else:
            print(shift_dataset(args.src, args.dst, args.transform, args.severity, args.seed, args.categories,
                                args.overwrite))
    except (ValueError, FileExistsError) as exc:  # DatasetError is a ValueError
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_conditions(src: str | Path, dst_root: str | Path, needs: dict[tuple[str, int], set[str]], seed: int,
                     categories: list[str] | None = None, workers: int | None = None) -> list[Path]:
    """Build each (transform, severity) copy with the MVTec folders it needs (``{"test"}`` or ``{"train", "test"}``).

    A copy that already holds those folders for those categories is kept; one that lacks a folder is rebuilt
    with the union, so asking for training images later never leaves a mixed copy. Copies are built in
    ``workers`` processes (default: one per core); each is written atomically, so the order does not matter.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cats = _resolve_categories(Path(src), categories)
    for transform, severity in needs:
        check_transform(transform, severity)
    jobs, paths = [], []
    for (transform, severity), parts in sorted(needs.items()):
        dst = family_path(dst_root, transform, severity, seed)
        paths.append(dst)
        have = read_manifest(dst)
        wanted = set(parts)
        if have is not None and _is_complete(dst, transform, severity, seed, cats):
            if wanted <= set(have["split"]):
                continue
            wanted |= set(have["split"])
        jobs.append((src, dst, transform, severity, seed, cats, True, False, tuple(sorted(wanted, reverse=True))))
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        for job in tqdm(jobs, desc="shift conditions", unit="dataset"):
            shift_dataset(*job)
    else:
        # spawn, not fork: a forked child of a process with torch threads running can deadlock.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in tqdm(pool.map(_shift_job, jobs), total=len(jobs), desc="shift conditions", unit="dataset"):
                pass
    return paths


def _shift_job(job: tuple) -> Path:
    return shift_dataset(*job)

"""MVTec-Shift: copies of an MVTec-layout dataset under controlled lighting, optics and pose shifts (as MVTec AD 2).

A shift is drawn either per image (``per_image``: augmentation-like variety) or once per condition and applied to
every image alike (``domain``: one new rig). Geometric shifts show the same scene from a changed pose: they warp the
generator's wider canvas where the dataset has one (data_prep.synthetic), else a reflected continuation of the image
whose pixels are marked invalid; ``border_fill`` is the control that adds only the old flat border.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from data_prep import synthetic
from helpers.data import (
    SHIFT_MANIFEST,
    DatasetError,
    Sample,
    list_categories,
    list_samples,
    load_image,
    load_mask,
    mask_path_for,
)
from helpers.paths import shift_copy_path, write_csv
from helpers.threads import one_torch_thread

SEVERITIES = (0, 1, 2, 3, 4, 5)
MODES = ("per_image", "domain")
# Sample splits of a dataset layout a copy may hold: MVTec AD's train and test folders, and MVTec AD 2's
# validation/good (read as "calib").
PARTS = ("train", "calib", "test")
MANIFEST = SHIFT_MANIFEST  # helpers.data reads the labels it records
MANIFEST_COLUMNS = ["category", "split", "defect_type", "image", "transform", "severity", "seed", "mode",
                    "label_before", "label_after", "invalid_fraction", "params"]
# Pixel quantities (blur sigma) are given for a 256 px side and scale with the image, so a severity means the
# same visual change whatever the source resolution. Every parameter is resolution-free for the same reason, and
# so that a domain condition can apply one parameter set to images of any size.
REFERENCE_SIDE = 256
# image_distances also compares images low-passed with a Gaussian of this fraction of the side (8 px at 256 px):
# coarser than the texture periods of the synthetic data, fine enough to see a 1 px blur.
LAYOUT_SCALE = 1 / 32
# The perspective camera looks at the object plane from this many image sides away (a normal lens).
PERSPECTIVE_DISTANCE = 2.0

# One row per transform: what the severity sets, its value at severities 1..5 (strictly growing), and what is
# drawn at random. Severity 0 is always the exact identity. The random part of a draw does not depend on the
# severity: an image (per_image) or a condition (domain) keeps its sign, direction and position at every
# severity and only the size of the change grows.
SEVERITY_TABLE: dict[str, dict[Any, Any]] = {
    "brightness": {"kind": "photometric", "parameter": "gain change v (gain 1 +/- v)",
                   1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, "drawn": "sign (brighter or darker)"},
    "contrast": {"kind": "photometric", "parameter": "contrast change v (factor 1 +/- v about the mean grey)",
                 1: 0.15, 2: 0.3, 3: 0.45, 4: 0.6, 5: 0.75, "drawn": "sign (more or less contrast)"},
    "gamma": {"kind": "photometric", "parameter": "gamma (or 1/gamma)",
              1: 1.15, 2: 1.3, 3: 1.5, 4: 1.75, 5: 2.0, "drawn": "direction (gamma or 1/gamma)"},
    "color_temperature": {"kind": "photometric", "parameter": "R and B gain change (R x (1+s), B x (1-s))",
                          1: 0.05, 2: 0.1, 3: 0.15, 4: 0.2, 5: 0.25, "drawn": "sign (warmer or cooler)"},
    "blur": {"kind": "photometric", "parameter": "Gaussian sigma, px at 256 px side",
             1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, "drawn": "nothing"},
    "noise": {"kind": "photometric", "parameter": "Gaussian noise std, grey levels",
              1: 5.0, 2: 10.0, 3: 15.0, 4: 20.0, 5: 25.0,
              "drawn": "noise seed (the field also depends on the image, so it differs per image in both modes)"},
    "gradient": {"kind": "photometric", "parameter": "illumination gain swing a (gain 1-a .. 1+a across the image)",
                 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5, "drawn": "ramp angle"},
    "spotlight": {"kind": "photometric", "parameter": "peak gain change of the spot",
                  1: 0.15, 2: 0.3, 3: 0.45, 4: 0.6, 5: 0.75,
                  "drawn": "centre, radius (0.15-0.35 of side), bright or dark"},
    "rotation": {"kind": "geometric", "parameter": "rotation angle, degrees",
                 1: 2.0, 2: 5.0, 3: 10.0, 4: 15.0, 5: 20.0, "drawn": "sign"},
    "translation": {"kind": "geometric", "parameter": "shift, fraction of side",
                    1: 0.02, 2: 0.05, 3: 0.08, 4: 0.12, 5: 0.16, "drawn": "direction"},
    "scale": {"kind": "geometric", "parameter": "zoom change v (scale 1 +/- v)",
              1: 0.05, 2: 0.1, 3: 0.15, 4: 0.2, 5: 0.25, "drawn": "zoom in or out"},
    "perspective": {"kind": "geometric",
                    "parameter": "tilt of the object plane about an axis through the centre, degrees "
                                 f"(camera {PERSPECTIVE_DISTANCE:g} sides away)",
                    1: 5.0, 2: 10.0, 3: 15.0, 4: 20.0, 5: 25.0, "drawn": "tilt axis direction"},
    "mixed": {"kind": "mixed", "parameter": "transforms composed per image, each at this severity",
              1: "2-3", 2: "2-3", 3: "2-3", 4: "2-3", 5: "2-3",
              "drawn": "which transforms (at most one geometric), then their own draws"},
    "border_fill": {"kind": "control",
                    "parameter": "angle of the rotation whose uncovered border is filled with the mean colour, "
                                 "degrees (no pose change)",
                    1: 2.0, 2: 5.0, 3: 10.0, 4: 15.0, 5: 20.0, "drawn": "sign"},
    "rotation_fill": {"kind": "control",
                      "parameter": "the old rotation: angle in degrees, the image itself rotated and the uncovered "
                                   "border filled with its mean colour (pose change and frame together)",
                      1: 2.0, 2: 5.0, 3: 10.0, 4: 15.0, 5: 20.0, "drawn": "sign"},
}
# Scale severity 5 was 0.3 and perspective was a random offset of each corner (up to 0.14 of the side, whose
# worst draws needed 0.8 of the side beyond the frame): both were lowered or replaced so that the generator's
# canvas (synthetic.CANVAS_MARGIN) holds every pose at severity 5.

# What the synthetic training images already vary (data_prep.synthetic), as the largest parameter value of a
# transform that stays inside that variation; a transform that is not listed is outside at every severity.
# The bound is the range the generator draws, or two standard deviations for a normal draw.
TRAINING_VARIATION: dict[str, dict[str, tuple[float, str]]] = {
    "carpet": {
        "brightness": (0.15, "lighting gain uniform 0.85-1.15"),
        "gradient": (0.15 * np.sqrt(2), "lighting ramp strength up to 0.15, swing up to 0.15 x sqrt(2) diagonally"),
        "color_temperature": (0.035, "pile colour jitter sd 2.5 % per channel: R/B ratio 2 sd = 7 %"),
        "rotation": (4.0, "loop direction normal, sd 2 degrees"),
        "translation": (np.inf, "stationary pile with a uniformly random phase: any shift is another carpet"),
        "scale": (0.05, "loop period uniform +/- 5 %"),
    },
    "hazelnut": {
        "brightness": (0.12, "lighting gain uniform 0.88-1.12"),
        "gradient": (0.08 * np.sqrt(2), "lighting ramp strength up to 0.08"),
        "color_temperature": (0.07, "nut colour jitter sd 5 % per channel: R/B ratio 2 sd = 14 %"),
        "rotation": (20.9, ("pose uniform; the light azimuth jitters with sd 10.4 degrees, so a rotated nut's "
                            "shading stays inside 2 sd up to 20.9 degrees")),
        "translation": (0.08, "nut centre jitter clipped at 0.08 of the side"),
        "scale": (0.077, "nut length uniform 0.90-1.05"),
    },
    "zipper": {
        "brightness": (0.15, "lighting gain uniform 0.85-1.15"),
        "gradient": (0.12 * np.sqrt(2), "lighting ramp strength up to 0.12"),
        "rotation": (2.0, "chain angle normal, sd 1 degree"),
        "translation": (0.03, "chain position across normal, sd 0.015 of the side (along it the phase is free)"),
    },
}


def in_training_variation(transform: str, severity: int, category: str) -> bool:
    """Whether a severity of a transform stays inside the variation the synthetic training images of
    ``category`` already have (see TRAINING_VARIATION): figures mark those cells, where a drop is not expected."""
    check_transform(transform, severity)
    if category not in TRAINING_VARIATION:
        raise ValueError(f"training variation is known for the synthetic categories "
                         f"{', '.join(TRAINING_VARIATION)}; got {category!r}")
    if severity == 0:
        return True
    bound = TRAINING_VARIATION[category].get(transform)
    return bound is not None and float(SEVERITY_TABLE[transform][severity]) <= bound[0]


def severity_table() -> pd.DataFrame:
    """The severity table as a tidy frame: one row per transform and severity, its parameter value, and whether
    it lies inside each synthetic category's training variation."""
    rows = []
    for name, row in SEVERITY_TABLE.items():
        for severity in range(1, 6):
            rows.append({"transform": name, "kind": row["kind"], "parameter": row["parameter"],
                         "severity": severity, "value": str(row[severity]), "drawn": row["drawn"],
                         **{f"inside_{c}": in_training_variation(name, severity, c) for c in TRAINING_VARIATION}})
    return pd.DataFrame(rows)


def severity_table_markdown() -> str:
    """The severity table as Markdown, with the conventions every shifted dataset follows and, per synthetic
    category, the severities that lie inside the training images' own variation."""
    cats = list(TRAINING_VARIATION)
    lines = ["| transform | kind | parameter | 1 | 2 | 3 | 4 | 5 | drawn | " + " | ".join(
                 f"inside {c}" for c in cats) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cats)]
    for name, row in SEVERITY_TABLE.items():
        values = " | ".join(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in range(1, 6))
        inside = [",".join(str(k) for k in range(1, 6) if in_training_variation(name, k, c)) or "-" for c in cats]
        lines.append(f"| {name} | {row['kind']} | {row['parameter']} | {values} | {row['drawn']} | "
                     + " | ".join(inside) + " |")
    lines += ["", ("Severity 0 is the exact identity. Severities grow strictly in the parameter and in the mean "
                   "absolute difference to the clean image at the layout scale (`image_distances`, tested per "
                   "category at 256 px; for a pose change of a periodic texture the plain pixel difference "
                   "saturates at severity 1, and a blur below a pixel at the image's own size changes nothing); "
                   "the random part of a draw is shared by all severities. `per_image` mode draws it per image, "
                   "`domain` mode once per condition for every image of train, validation and test. Geometric "
                   "transforms warp the generator's wider canvas (synthetic data) and crop back, so nothing enters "
                   "the frame that the scene does not hold; on other data they warp a reflected continuation and "
                   "mark those pixels False in `valid` (the manifest records their fraction per image). "
                   "`border_fill` is the control: the uncovered border of the old rotation at that angle, filled "
                   "with the image's mean colour, without any pose change. So that the canvas holds every pose at "
                   "severity 5, scale severity 5 is 0.25 (was 0.3) and perspective tilts the object plane (it "
                   "moved each corner at random, up to 0.14 of the side). Pixel sizes scale with the image side "
                   f"(given at {REFERENCE_SIDE} px). `mixed` composes at most one geometric step, then lighting, "
                   "then blur, then noise (pose, scene light, optics, sensor). 'inside <category>' lists the "
                   "severities that stay inside the variation the synthetic training images of that category "
                   "already have (TRAINING_VARIATION).")]
    return "\n".join(lines)


def _value(name: str, severity: int) -> float:
    return SEVERITY_TABLE[name][severity]


def _round(x: float, digits: int = 4) -> float:
    # draws are rounded before use, so the manifest stays readable and still replays exactly
    return round(float(x), digits)


def _sign(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


@dataclass(frozen=True)
class Surround:
    """The scene around an image: a wider canvas whose central crop, ``margin`` px in from each edge, is the
    image (and the canvas mask, whose crop is the image's mask). Geometric shifts sample it instead of inventing
    content beyond the frame."""

    image: np.ndarray  # uint8 (H + 2 margin, W + 2 margin, 3)
    mask: np.ndarray | None  # bool, same size, or None for an image without a mask
    margin: int


@dataclass
class _Context:
    surround: Surround | None  # None once a step has changed the image, so a later warp cannot use stale content
    content_key: int  # digest of the unshifted image: noise fields differ per image with the same params


# --- photometric: numpy on float32 images in [0, 255]; each clips, as a saturated sensor would ---------------

def _brightness(img, p, ctx):
    return np.clip(img * p["gain"], 0, 255)


def _contrast(img, p, ctx):
    grey = img.mean()  # one scalar for all channels, so contrast does not shift the colour balance
    return np.clip(grey + p["factor"] * (img - grey), 0, 255)


def _gamma(img, p, ctx):
    return 255.0 * (img / 255.0) ** p["gamma"]


def _color_temperature(img, p, ctx):
    gains = np.array([p["red_gain"], 1.0, p["blue_gain"]], np.float32)
    return np.clip(img * gains, 0, 255)


def _blur(img, p, ctx):
    sigma = p["sigma_px_at_256"] * min(img.shape[:2]) / REFERENCE_SIDE
    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def _noise(img, p, ctx):
    # The field is keyed by the params' seed and by the image itself: in domain mode every image shares the
    # params (one sensor) and still gets its own noise, as frames of one camera do.
    field_rng = np.random.default_rng([p["noise_seed"], ctx.content_key])
    noise = field_rng.normal(0.0, p["std"], img.shape).astype(np.float32)
    return np.clip(img + noise, 0, 255)


@lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _gradient(img, p, ctx):
    h, w = img.shape[:2]
    yy, xx = _pixel_grid(h, w)
    theta = np.deg2rad(p["angle_deg"])
    ramp = (xx - (w - 1) / 2) * np.cos(theta) + (yy - (h - 1) / 2) * np.sin(theta)
    ramp /= max(np.abs(ramp).max(), 1e-6)  # -1 .. 1 across the image whatever the angle
    return np.clip(img * (1 + p["swing"] * ramp).astype(np.float32)[..., None], 0, 255)


def _spotlight(img, p, ctx):
    h, w = img.shape[:2]
    yy, xx = _pixel_grid(h, w)
    r2 = (xx - p["cx"] * (w - 1)) ** 2 + (yy - p["cy"] * (h - 1)) ** 2
    sigma = p["radius"] * min(h, w)
    spot = np.exp(-r2 / (2 * sigma**2))
    return np.clip(img * (1 + p["peak"] * spot).astype(np.float32)[..., None], 0, 255)


# --- geometric: a homography from output pixels to source pixels, sampled from the canvas or a reflection -----

def _about_centre(linear: np.ndarray, h: int, w: int) -> np.ndarray:
    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], float)
    back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], float)
    return back @ linear @ to_centre


def _rotation_source(p, h, w):
    # Positive angles turn the picture counter-clockwise on screen; the source of an output pixel lies at the
    # opposite turn.
    t = np.deg2rad(p["angle_deg"])
    c, s = np.cos(t), np.sin(t)
    return _about_centre(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]), h, w)


def _translation_source(p, h, w):
    # whole pixels, so a pure translation copies pixel values exactly
    dx, dy = round(p["dx"] * w), round(p["dy"] * h)
    return np.array([[1, 0, -dx], [0, 1, -dy], [0, 0, 1]], float)


def _scale_source(p, h, w):
    return _about_centre(np.diag([1 / p["scale"], 1 / p["scale"], 1.0]), h, w)


def _perspective_source(p, h, w):
    """The object plane tilted about an in-plane axis through the centre, seen by a pinhole camera at
    PERSPECTIVE_DISTANCE sides: the centre stays put and keeps its scale, the far side shrinks, the near grows."""
    d = PERSPECTIVE_DISTANCE * max(h, w)
    tilt, axis = np.deg2rad(p["tilt_deg"]), np.deg2rad(p["axis_deg"])
    u = np.array([np.cos(axis), np.sin(axis), 0.0])
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    rot = np.eye(3) + np.sin(tilt) * cross + (1 - np.cos(tilt)) * cross @ cross  # Rodrigues
    # plane point (x, y) -> camera (R [x, y, 0] + [0, 0, d]) -> image d * (X / Z, Y / Z)
    forward = np.diag([d, d, 1.0]) @ np.column_stack([rot[:, 0], rot[:, 1], [0.0, 0.0, d]])
    return _about_centre(np.linalg.inv(forward / forward[2, 2]), h, w)


def _source_coords(source: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _pixel_grid(h, w)
    x, y, z = (source @ np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)])).reshape(3, h, w)
    return y / z, x / z


def _inside(sy: np.ndarray, sx: np.ndarray, h: int, w: int) -> np.ndarray:
    eps = 1e-6  # bilinear taps at the last row or column still come from real pixels
    return (sy >= -eps) & (sy <= h - 1 + eps) & (sx >= -eps) & (sx <= w - 1 + eps)


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected about the first and last pixel centres (d c b | a b c d | c b a)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _bilinear(base: np.ndarray, sy: np.ndarray, sx: np.ndarray, outside: str = "mirror") -> np.ndarray:
    """Sample ``base`` (H, W[, C]) at fractional pixel positions; beyond the edge the image is reflected about
    its edge pixels (``mirror``) or zero (``zero``). Whole-pixel positions return the pixel values."""
    h, w = base.shape[:2]
    # grid_sample: about ten times faster than scipy's map_coordinates at 256 px, with the same result
    grid = np.stack([sx * (2 / max(w - 1, 1)) - 1, sy * (2 / max(h - 1, 1)) - 1], axis=-1).astype(np.float32)
    channels = base[..., None] if base.ndim == 2 else base
    planes = torch.from_numpy(np.ascontiguousarray(channels.transpose(2, 0, 1), dtype=np.float32))[None]
    out = torch.nn.functional.grid_sample(planes, torch.from_numpy(grid)[None], mode="bilinear",
                                          padding_mode="reflection" if outside == "mirror" else "zeros",
                                          align_corners=True)
    out = out[0].permute(1, 2, 0).numpy()
    return out if base.ndim == 3 else out[..., 0]


def _nearest(base: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    h, w = base.shape[:2]
    yi, xi = _mirror(np.rint(sy).astype(np.int64), h), _mirror(np.rint(sx).astype(np.int64), w)
    return base[yi, xi]


def _warp(img, mask, valid, source, ctx):
    """Move image, mask and valid map together by the homography ``source`` (output -> source pixels).

    With a surround the pose change shows the surrounding scene; without one, a reflection of the image
    continues it and those pixels are False in ``valid`` (and never a defect)."""
    h, w = img.shape[:2]
    sy, sx = _source_coords(source, h, w)
    surround = ctx.surround
    if surround is not None:
        base, base_mask, offset = surround.image.astype(np.float32), surround.mask, surround.margin
    else:
        base, base_mask, offset = img, mask, 0
    cy, cx = sy + offset, sx + offset
    new_valid = _inside(cy, cx, *base.shape[:2])
    if not valid.all():
        # pixels already invalid stay invalid where they are seen again; the surround's margin is real scene
        carried = _nearest(np.pad(valid, 1, constant_values=surround is not None), sy + 1, sx + 1)
        new_valid &= carried
    out = _bilinear(base, cy, cx)
    new_mask = None
    if mask is not None:
        new_mask = _nearest(base_mask, cy, cx) & new_valid  # a reflected defect is not a defect of this picture
    ctx.surround = None
    return np.clip(out, 0, 255), new_mask, new_valid


def _border_fill(img, mask, valid, p, ctx):
    """The control: the frame the old rotation by ``angle_deg`` left uncovered, in the image's mean colour, over
    the unrotated image; the frame is False in ``valid``."""
    h, w = img.shape[:2]
    sy, sx = _source_coords(_rotation_source(p, h, w), h, w)
    # the bilinear coverage of the rotated frame, so the frame's edge is as soft as the old rotation's was
    coverage = np.clip(_bilinear(np.ones((h, w), np.float32), sy, sx, outside="zero"), 0, 1)[..., None]
    mean = img.reshape(-1, 3).mean(axis=0)
    out = img * coverage + mean * (1 - coverage)
    new_valid = valid & _inside(sy, sx, h, w)  # exactly the pixels the rotation would mark
    ctx.surround = None
    return out, None if mask is None else mask & new_valid, new_valid


def _rotation_fill(img, mask, valid, p, ctx):
    """The old rotation, kept as a control: the image itself rotated by ``angle_deg`` (no canvas), the border
    that comes into view filled with its mean colour. Against ``rotation`` (the same pose on the canvas) and
    ``border_fill`` (the same frame without the pose) it splits the old geometric drop into its two causes."""
    h, w = img.shape[:2]
    sy, sx = _source_coords(_rotation_source(p, h, w), h, w)
    coverage = np.clip(_bilinear(np.ones((h, w), np.float32), sy, sx, outside="zero"), 0, 1)[..., None]
    mean = img.reshape(-1, 3).mean(axis=0)
    out = _bilinear(img, sy, sx, outside="zero") + mean * (1 - coverage)
    new_valid = valid & _inside(sy, sx, h, w)
    new_mask = None if mask is None else _nearest(mask, sy, sx) & new_valid
    ctx.surround = None
    return np.clip(out, 0, 255), new_mask, new_valid


# --- draws: everything random goes into params, so params alone replay the transform. Each draw uses the same
# random numbers whatever the severity, so a higher severity is the same change, only larger -------------------

def _draw_translation(v, rng):
    theta = rng.uniform(0, 2 * np.pi)
    return {"dx": _round(v * np.cos(theta), 5), "dy": _round(v * np.sin(theta), 5)}


def _draw_color_temperature(v, rng):
    warmer = _sign(rng)
    return {"red_gain": 1 + warmer * v, "blue_gain": 1 - warmer * v}


def _draw_spotlight(v, rng):
    cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.35)
    return {"cx": _round(cx), "cy": _round(cy), "radius": _round(radius), "peak": float(_sign(rng) * v)}


@dataclass(frozen=True)
class Transform:
    kind: str  # "photometric", "geometric" or "control"
    stage: int  # order inside `mixed`: pose (0), scene light (1), optics (2), sensor (3)
    draw: Callable[[float, np.random.Generator], dict]
    # photometric (img, p, ctx) -> img; geometric (p, h, w) -> homography from output to source pixels;
    # control (img, mask, valid, p, ctx) -> (img, mask, valid)
    render: Callable


TRANSFORMS: dict[str, Transform] = {
    "brightness": Transform("photometric", 1, lambda v, rng: {"gain": 1 + _sign(rng) * v}, _brightness),
    "contrast": Transform("photometric", 1, lambda v, rng: {"factor": 1 + _sign(rng) * v}, _contrast),
    "gamma": Transform("photometric", 1, lambda v, rng: {"gamma": v if _sign(rng) > 0 else _round(1 / v)}, _gamma),
    "color_temperature": Transform("photometric", 1, _draw_color_temperature, _color_temperature),
    "blur": Transform("photometric", 2, lambda v, rng: {"sigma_px_at_256": v}, _blur),
    "noise": Transform("photometric", 3, lambda v, rng: {"std": v, "noise_seed": int(rng.integers(2**32))}, _noise),
    "gradient": Transform("photometric", 1, lambda v, rng: {"angle_deg": _round(rng.uniform(0, 360)), "swing": v},
                          _gradient),
    "spotlight": Transform("photometric", 1, _draw_spotlight, _spotlight),
    "rotation": Transform("geometric", 0, lambda v, rng: {"angle_deg": float(_sign(rng) * v)}, _rotation_source),
    "translation": Transform("geometric", 0, _draw_translation, _translation_source),
    "scale": Transform("geometric", 0, lambda v, rng: {"scale": 1 + _sign(rng) * v}, _scale_source),
    "perspective": Transform("geometric", 0,
                             lambda v, rng: {"tilt_deg": v, "axis_deg": _round(rng.uniform(0, 180))},
                             _perspective_source),
    "border_fill": Transform("control", 0, lambda v, rng: {"angle_deg": float(_sign(rng) * v)}, _border_fill),
    "rotation_fill": Transform("control", 0, lambda v, rng: {"angle_deg": float(_sign(rng) * v)}, _rotation_fill),
}
TRANSFORM_NAMES = (*TRANSFORMS, "mixed")
GEOMETRIC = tuple(n for n, t in TRANSFORMS.items() if t.kind == "geometric")
# what `mixed` composes: the shifts themselves, never the control
MIXABLE = tuple(n for n, t in TRANSFORMS.items() if t.kind != "control")


def check_transform(transform: str, severity: int) -> None:
    """Raise a ValueError naming the bad parameter and the allowed values."""
    if transform not in TRANSFORM_NAMES:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORM_NAMES)}; got {transform!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 0..5; got {severity!r}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


def _draw(transform: str, severity: int, rng: np.random.Generator) -> dict:
    if transform != "mixed":
        return TRANSFORMS[transform].draw(_value(transform, severity), rng)
    # One pose change at most: the canvas covers one geometric step at full severity, and a pose is one move.
    names, pool = [], list(MIXABLE)
    for _ in range(int(rng.integers(2, 4))):
        name = str(pool[int(rng.integers(len(pool)))])
        names.append(name)
        pool = [n for n in pool if n != name and not (name in GEOMETRIC and n in GEOMETRIC)]
    names.sort(key=lambda n: TRANSFORMS[n].stage)  # stable: same-stage transforms keep their drawn order
    return {"steps": [{"transform": n, "params": _draw(n, severity, rng)} for n in names]}


def _render(transform, params, img, mask, valid, ctx):
    if transform == "mixed":
        for step in params["steps"]:
            img, mask, valid = _render(step["transform"], step["params"], img, mask, valid, ctx)
        return img, mask, valid
    t = TRANSFORMS[transform]
    if t.kind == "geometric":
        return _warp(img, mask, valid, t.render(params, *img.shape[:2]), ctx)
    if t.kind == "control":
        return t.render(img, mask, valid, params, ctx)
    ctx.surround = None
    return t.render(img, params, ctx).astype(np.float32, copy=False), mask, valid


def needs_surround(transform: str, params: dict) -> bool:
    """Whether applying these params warps the image, so that a canvas would be used."""
    if transform == "mixed":
        return any(needs_surround(s["transform"], s["params"]) for s in params.get("steps", []))
    return transform in GEOMETRIC


def _check_inputs(image, mask, surround):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
    if mask is not None and np.shape(mask) != image.shape[:2]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape[:2]}")
    if surround is not None:
        m, (h, w) = surround.margin, image.shape[:2]
        if surround.image.shape != (h + 2 * m, w + 2 * m, 3):
            raise ValueError(f"surround image is {surround.image.shape}, expected {(h + 2 * m, w + 2 * m, 3)} for "
                             f"a {h}x{w} image with margin {m}")
        if (mask is None) != (surround.mask is None):
            raise ValueError("surround.mask must be given exactly when the image has a mask")


def apply_with_params(image: np.ndarray, mask: np.ndarray | None, transform: str, severity: int, params: dict,
                      surround: Surround | None = None):
    """Re-apply a transform exactly from recorded params; returns ``(image, mask, valid, params)`` as :func:`apply`."""
    check_transform(transform, severity)
    _check_inputs(image, mask, surround)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    valid = np.ones(image.shape[:2], dtype=bool)
    if severity == 0:
        return image.copy(), None if mask is None else mask.copy(), valid, {}
    ctx = _Context(surround=surround, content_key=zlib.crc32(image.tobytes()))
    img, mask, valid = _render(transform, params, image.astype(np.float32), mask, valid, ctx)
    return np.rint(img).astype(np.uint8), mask, valid, params


def apply(image: np.ndarray, mask: np.ndarray | None, transform: str, severity: int, rng: np.random.Generator,
          surround: Surround | None = None):
    """Shift one image (uint8 RGB) and move its bool mask with it.

    Returns ``(image, mask, valid, params)``: the shifted image, the moved mask (None if ``mask`` is None), where
    pixels show the scene (False where a geometric shift had to reflect the image, or on border_fill's frame),
    and the JSON-serialisable draws that :func:`apply_with_params` replays. ``surround`` is the scene around the
    image (a generator's canvas); geometric shifts sample it and leave every pixel valid.
    """
    check_transform(transform, severity)
    params = {} if severity == 0 else _draw(transform, severity, rng)
    return apply_with_params(image, mask, transform, severity, params, surround)


# --- dataset level -------------------------------------------------------------------------------------------

def sample_rng(seed: int, transform: str, severity: int, key: str) -> np.random.Generator:
    """The random draws of one image in ``per_image`` mode, from (seed, transform, relative path).

    ``severity`` does not enter the stream on purpose: an image keeps its sign, direction and position at every
    severity, so a higher severity is the same change, only larger. (It is accepted so that callers pass what
    they shift.)"""
    digest = hashlib.sha256(f"{seed}|{transform}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def domain_rng(seed: int, transform: str) -> np.random.Generator:
    """The one draw of a ``domain`` condition (every image alike), shared by all severities as in sample_rng."""
    digest = hashlib.sha256(f"{seed}|{transform}|domain".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def draw_params(transform: str, severity: int, seed: int, key: str, mode: str = "per_image") -> dict:
    """The params that shift_dataset applies to the image ``key`` (ignored in domain mode)."""
    check_transform(transform, severity)
    check_mode(mode)
    if severity == 0:
        return {}
    rng = sample_rng(seed, transform, severity, key) if mode == "per_image" else domain_rng(seed, transform)
    return _draw(transform, severity, rng)


def family_path(dst_root: str | Path, transform: str, severity: int, seed: int, mode: str = "per_image") -> Path:
    """Where one member of a shift family lives: ``<dst_root>/<mode>/<transform>/severity=<k>/seed=<n>``."""
    check_mode(mode)
    return shift_copy_path(dst_root, mode, transform, severity, seed)


def load_surround(src: str | Path, sample: Sample, image: np.ndarray) -> Surround | None:
    """The generator's canvas around a sample's image, or None for a dataset without canvases.

    Refuses a canvas whose centre is not exactly the image (a stale canvas beside re-written images)."""
    src = Path(src)
    info = synthetic.read_canvas_info(src / sample.category)
    if info is None:
        return None
    path = synthetic.canvas_path_for(src, sample.key)
    canvas = load_image(path)  # DatasetError names a missing file
    m, (h, w) = info["margin"], image.shape[:2]
    if canvas.shape != (h + 2 * m, w + 2 * m, 3) or not np.array_equal(canvas[m:m + h, m:m + w], image):
        raise DatasetError(f"canvas {path} does not hold its image {sample.image_path} at its centre; regenerate "
                           f"the dataset (python -m data_prep.synthetic --overwrite)")
    canvas_mask = None
    if sample.mask_path is not None:
        canvas_mask = load_mask(synthetic.canvas_path_for(src, sample.key, mask=True))
        if canvas_mask.shape != canvas.shape[:2] or not np.array_equal(canvas_mask[m:m + h, m:m + w],
                                                                       load_mask(sample.mask_path)):
            raise DatasetError(f"canvas mask of {sample.mask_path} does not hold the mask at its centre; "
                               f"regenerate the dataset")
    return Surround(image=canvas, mask=canvas_mask, margin=m)


def _load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    image = load_image(sample.image_path)
    mask = None if sample.mask_path is None else load_mask(sample.mask_path)
    if mask is not None and mask.shape != image.shape[:2]:
        raise DatasetError(f"mask {sample.mask_path} is {mask.shape}, its image {sample.image_path} is "
                           f"{image.shape[:2]}")
    return image, mask


def _shifted(src: Path, sample: Sample, transform: str, severity: int, params: dict):
    """The shifted image, mask and valid map of one sample, using the dataset's canvas where it has one."""
    image, mask = _load_sample(sample)
    surround = load_surround(src, sample, image) if needs_surround(transform, params) else None
    shifted, mask, valid, _ = apply_with_params(image, mask, transform, severity, params, surround)
    return image, shifted, mask, valid


def _save_image(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Format follows the source suffix, so file names stay the same; PNG at level 1 writes about four times
    # faster than the default and is lossless all the same.
    options = {"compress_level": 1} if path.suffix.lower() == ".png" else {}
    Image.fromarray(array).save(path, **options)


def _shift_sample(src: Path, sample: Sample, out: Path, transform: str, severity: int, seed: int, mode: str,
                  params: dict) -> dict:
    image_out = out / sample.key
    invalid_fraction = 0.0
    if severity == 0:
        # a byte copy is the exact identity, also for lossy sources and grey files
        image_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.image_path, image_out)
        if sample.mask_path is not None:
            mask_out = mask_path_for(out, sample.category, sample.defect_type, sample.image_path)
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.mask_path, mask_out)
        mask = None if sample.mask_path is None else load_mask(sample.mask_path)
    else:
        _, shifted, mask, valid = _shifted(src, sample, transform, severity, params)
        invalid_fraction = 1.0 - float(valid.mean())
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
            "mode": mode, "label_before": sample.label, "label_after": label_after,
            "invalid_fraction": round(invalid_fraction, 6), "params": json.dumps(params, sort_keys=True)}


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


def _select_samples(src: Path, categories, parts: Iterable[str], keys: set[str] | None) -> list[Sample]:
    samples = [s for c in _resolve_categories(src, categories) for s in list_samples(src, c) if s.split in parts]
    if keys is None:
        return samples
    keys = set(keys)
    unknown = sorted(keys - {s.key for s in samples})
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ValueError(f"keys not among the samples of {src} in parts {tuple(parts)}: {shown}")
    return [s for s in samples if s.key in keys]


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
                  parts: tuple[str, ...] = ("train", "test"), mode: str = "per_image",
                  keys: set[str] | None = None) -> Path:
    """Write a shifted MVTec-layout copy of ``src`` at ``dst`` plus its manifest (one row per written image).

    ``parts`` chooses the MVTec folders to shift: a test-only copy serves evaluation; the training images are
    only needed where a model is re-fitted on shifted normals. ``keys`` (sample keys
    ``<category>/<split>/<defect>/<name>``) narrows that to the images a study uses. ``mode`` draws the params per
    image (``per_image``) or once for the whole condition (``domain``). An image's params never depend on
    ``parts``, ``keys`` or ``categories``.
    """
    check_transform(transform, severity)
    check_mode(mode)
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    src, dst = Path(src), Path(dst)
    _check_locations(src, dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to rebuild it")
    samples = _select_samples(src, categories, parts, keys)
    domain = draw_params(transform, severity, seed, "", "domain") if mode == "domain" else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
    try:
        with one_torch_thread():
            rows = [_shift_sample(src, s, tmp, transform, severity, seed, mode,
                                  domain if domain is not None else draw_params(transform, severity, seed, s.key))
                    for s in tqdm(samples, desc=f"{mode} {transform} severity={severity}", unit="img", leave=False,
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
    text_columns = {c: str for c in ("category", "split", "defect_type", "image", "transform", "mode", "params")}
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
    category, split, defect_type, _ = key.split("/")
    src = Path(src)
    image_path = src / key
    mask_path = None
    if row["label_before"] == 1 and (src / category / "ground_truth").is_dir():
        mask_path = mask_path_for(src, category, defect_type, image_path)
    sample = Sample(category, split, int(row["label_before"]), defect_type, image_path, mask_path)
    params = json.loads(row["params"])
    _, shifted, mask, valid = _shifted(src, sample, row["transform"], int(row["severity"]), params)
    return shifted, mask, valid, params


def _layout(image: np.ndarray) -> np.ndarray:
    """The image low-passed at LAYOUT_SCALE; block means first, so the Gaussian runs on a small grid."""
    sigma = LAYOUT_SCALE * min(image.shape[:2])
    block = max(1, int(sigma // 2))
    h, w = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    small = image[:h, :w].astype(np.float32).reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))
    return gaussian_filter(small, (sigma / block, sigma / block, 0), mode="reflect")


def image_distances(src: str | Path, transforms: Iterable[str], severities: Iterable[int], seed: int,
                    categories: list[str] | None = None, mode: str = "per_image",
                    parts: tuple[str, ...] = ("train", "test"), keys: set[str] | None = None) -> pd.DataFrame:
    """How much each severity changes the images: per category, transform and severity, the mean over the images
    shift_dataset would write (nothing is written) of the absolute difference to the clean image, in grey levels.

    ``pixel_abs_diff`` compares pixels; ``layout_abs_diff`` compares both images low-passed at LAYOUT_SCALE. A pose
    change of a stationary or periodic texture (carpet, the zipper's teeth) makes the pixel difference saturate
    at severity 1, once the shift exceeds the texture's period, and then wander with the texture's phase; at the
    layout scale the texture is averaged out and the difference keeps growing with the pose change.
    """
    src = Path(src)
    check_mode(mode)
    conditions = [(t, int(k)) for t in transforms for k in severities]
    for transform, severity in conditions:
        check_transform(transform, severity)
    with one_torch_thread():
        found = _distances_per_image(src, _select_samples(src, categories, parts, keys), conditions, seed, mode)
    rows = [{"category": c, "transform": t, "severity": k, "mode": mode, "n_images": len(d),
             "pixel_abs_diff": float(np.mean([p for p, _ in d])), "layout_abs_diff": float(np.mean([q for _, q in d]))}
            for (c, t, k), d in found.items()]
    return pd.DataFrame(rows, columns=["category", "transform", "severity", "mode", "n_images", "pixel_abs_diff",
                                       "layout_abs_diff"])


def _distances_per_image(src: Path, samples: list[Sample], conditions: list[tuple[str, int]], seed: int,
                         mode: str) -> dict[tuple[str, str, int], list[tuple[float, float]]]:
    """(category, transform, severity) -> (pixel, layout) distance of every image; each image is read once."""
    found: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for s in samples:
        image, mask = _load_sample(s)
        clean_layout = _layout(image)
        surround = None
        for transform, severity in conditions:
            params = draw_params(transform, severity, seed, s.key, mode)
            if surround is None and needs_surround(transform, params):
                surround = load_surround(src, s, image) or False
            shifted = apply_with_params(image, mask, transform, severity, params, surround or None)[0]
            pixel = float(np.abs(shifted.astype(np.float32) - image).mean())
            layout = float(np.abs(_layout(shifted) - clean_layout).mean()) if severity else 0.0
            found.setdefault((s.category, transform, severity), []).append((pixel, layout))
    return found


def is_complete(dst: Path, transform: str, severity: int, seed: int, categories: list[str],
                 mode: str = "per_image") -> bool:
    df = read_manifest(dst)
    if df is None or "mode" not in df.columns:  # no copy, or one written before modes existed
        return False
    return (set(df["transform"]) == {transform} and set(df["severity"]) == {severity} and set(df["seed"]) == {seed}
            and set(df["category"]) == set(categories) and set(df["mode"]) == {mode})


def shift_family(src: str | Path, dst_root: str | Path, transforms: list[str], severities: list[int], seed: int,
                 categories: list[str] | None = None, mode: str = "per_image") -> list[Path]:
    """Build every (transform, severity) copy under ``dst_root``; members that already exist complete are kept."""
    check_mode(mode)
    for t in transforms:
        for k in severities:
            check_transform(t, k)  # fail before hours of work, not halfway through
    cats = _resolve_categories(Path(src), categories)
    jobs = [(t, k) for t in transforms for k in severities]
    paths = []
    for t, k in tqdm(jobs, desc="shift family", unit="dataset"):
        dst = family_path(dst_root, t, k, seed, mode)
        if dst.exists() and not is_complete(dst, t, k, seed, cats, mode):
            raise FileExistsError(f"{dst} exists but is not a complete {mode} {t} severity={k} seed={seed} copy "
                                  f"of categories {cats}; remove it to rebuild")
        if not dst.exists():
            shift_dataset(src, dst, t, k, seed, categories=cats, mode=mode)
        paths.append(dst)
    return paths


def shift_condition_job(src: str | Path, dst_root: str | Path, transform: str, severity: int, seed: int,
                        mode: str = "per_image", categories: list[str] | None = None,
                        parts: tuple[str, ...] = ("train", "test"), keys: set[str] | None = None,
                        progress: bool = False) -> Path:
    """Build (or rebuild) one condition at its family path: the unit of work a job runner schedules."""
    dst = family_path(dst_root, transform, severity, seed, mode)
    return shift_dataset(src, dst, transform, severity, seed, categories=categories, overwrite=True,
                         progress=progress, parts=tuple(parts), mode=mode, keys=keys)


def build_conditions(src: str | Path, dst_root: str | Path, needs: dict[tuple[str, int], set[str]], seed: int,
                     categories: list[str] | None = None, execution=0, mode: str = "per_image") -> list[Path]:
    """Build each (transform, severity) copy with the MVTec folders it needs (``{"test"}`` or ``{"train", "test"}``).

    A copy that already holds those folders for those categories is kept; one that lacks a folder is rebuilt
    with the union, so asking for training images later never leaves a mixed copy. Copies are jobs of the
    study's job runner (``execution``: the configuration's execution section or a worker count); each is written
    atomically, so the order does not matter.
    """
    from helpers.parallel import run_jobs

    check_mode(mode)
    cats = _resolve_categories(Path(src), categories)
    for transform, severity in needs:
        check_transform(transform, severity)
    jobs, paths = [], []
    for (transform, severity), parts in sorted(needs.items()):
        dst = family_path(dst_root, transform, severity, seed, mode)
        paths.append(dst)
        have = read_manifest(dst)
        wanted = set(parts)
        if have is not None and is_complete(dst, transform, severity, seed, cats, mode):
            if wanted <= set(have["split"]):
                continue
            wanted |= set(have["split"])
        jobs.append((src, dst_root, transform, severity, seed, mode, cats, tuple(sorted(wanted, reverse=True))))
    run_jobs(shift_condition_job, jobs, execution, desc="shift conditions")
    return paths


def example_panels(src: str | Path, category: str, transforms: Iterable[str], severities: Iterable[int], seed: int,
                   mode: str = "domain") -> list[list[tuple[np.ndarray, np.ndarray | None]]]:
    """One defective test image of a category under every transform (rows) and severity (columns), exactly as a
    shifted copy holds it (the generator's canvas included): ``(image, mask)`` per panel, for a figure."""
    src = Path(src)
    sample = next((s for s in list_samples(src, category) if s.label == 1 and s.mask_path is not None), None)
    if sample is None:
        sample = next(s for s in list_samples(src, category) if s.split == "test")
    rows = []
    for transform in transforms:
        row = []
        for severity in severities:
            params = draw_params(transform, int(severity), seed, sample.key, mode)
            _, shifted, mask, _ = _shifted(src, sample, transform, int(severity), params)
            row.append((shifted, mask))
        rows.append(row)
    return rows


# --- command line --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shift", description=__doc__,
                                epilog="Severity table:\n\n" + severity_table_markdown(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="MVTec-layout dataset root (never modified)")
    p.add_argument("--dst", help="output root for one shifted copy")
    p.add_argument("--transform", help=f"one of: {', '.join(TRANSFORM_NAMES)}")
    p.add_argument("--severity", type=int, help="0 (identity) .. 5")
    p.add_argument("--mode", default="per_image", help="per_image (draws per image, default) or domain (one draw "
                                                       "for every image of the condition)")
    p.add_argument("--family", action="store_true", help="build every --transforms x --severities copy")
    p.add_argument("--dst-root", help="family root: <dst-root>/<mode>/<transform>/severity=<k>/seed=<n>/")
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
        check_mode(args.mode)
        if args.family:
            for path in shift_family(args.src, args.dst_root, args.transforms, args.severities, args.seed,
                                     args.categories, mode=args.mode):
                print(path)
        else:
            print(shift_dataset(args.src, args.dst, args.transform, args.severity, args.seed, args.categories,
                                args.overwrite, mode=args.mode))
    except (ValueError, FileExistsError) as exc:  # DatasetError is a ValueError
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

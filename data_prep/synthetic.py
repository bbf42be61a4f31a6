"""Generate the embedded synthetic dataset: three MVTec-AD-like categories (carpet, hazelnut, zipper) with
pixel-exact defect masks, built offline and byte-for-byte reproducibly from a seed, so the study runs end to
end without downloading MVTec AD; and two look-alikes of them (rug, walnut) for the unified study's close set.

Usage: ``python -m data_prep.synthetic --root data/synthetic --seed 0`` or :func:`generate` from a notebook.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

CATEGORIES = ("carpet", "hazelnut", "zipper")
DEFECTS = {
    "carpet": ("color", "hole", "thread"),
    "hazelnut": ("crack", "hole", "print"),
    "zipper": ("broken_teeth", "fabric_interior", "squeezed_teeth"),
}
# Look-alikes of main categories, made for the unified study's close set only (first data draw; the drop study
# never sees them): each shares its twin's defect types and much of its look, in another colour and weave or
# as another species. Look-alike -> the main category it resembles.
CLOSE_CATEGORIES = {"rug": "carpet", "walnut": "hazelnut"}
CLOSE_DEFECTS = {name: DEFECTS[twin] for name, twin in CLOSE_CATEGORIES.items()}
ALL_CATEGORIES = CATEGORIES + tuple(CLOSE_CATEGORIES)


def defects_of(category: str) -> tuple[str, ...]:
    """The defect types of a main or look-alike category."""
    return {**DEFECTS, **CLOSE_DEFECTS}[category]


# MVTec AD's defect types that have no renderer of their own here, each drawn by the nearest renderer of its
# category (from its own random stream, so its images differ from those of the type that draws it): a cut in a
# hazelnut's shell is a thin dark line like a crack; a cut in a carpet opens the backing like a hole; metal
# contamination is a foreign piece lying on the pile like a loose thread; a zipper's combined defects are shown by
# their most common part, broken teeth; fabric on the border and rough fabric are patches of changed weave like
# the interior's; split teeth are teeth pushed out of line like squeezed ones.
STAND_IN_DEFECTS = {
    "hazelnut": {"cut": "crack"},
    "carpet": {"cut": "hole", "metal_contamination": "thread"},
    "zipper": {"combined": "broken_teeth", "fabric_border": "fabric_interior", "rough": "fabric_interior",
               "split_teeth": "squeezed_teeth"},
}
# MVTec AD's own shape (Bergmann et al., 2019/2021) for the categories generated here: train normals, test images
# per type, and the categories it ships as single-channel greyscale. Images are 1024 px square in all three.
MVTEC_AD_SIZE = 1024
MVTEC_AD = {
    "hazelnut": {"train": 391, "test": {"good": 40, "crack": 18, "cut": 17, "hole": 18, "print": 17}},
    "carpet": {"train": 280, "test": {"good": 28, "color": 19, "cut": 17, "hole": 17, "metal_contamination": 17,
                                      "thread": 19}},
    "zipper": {"train": 240, "test": {"good": 32, "broken_teeth": 19, "combined": 16, "fabric_border": 17,
                                      "fabric_interior": 16, "rough": 17, "split_teeth": 18, "squeezed_teeth": 16}},
}
MVTEC_AD_GREYSCALE = ("zipper",)


def defect_types(category: str) -> tuple[str, ...]:
    """Every defect type the generator can draw on a category: its own renderers' and the stand-in ones."""
    return tuple(DEFECT_RENDERERS[category]) + tuple(STAND_IN_DEFECTS.get(category, {}))


def _renderer(category: str, defect_type: str) -> Callable:
    own = DEFECT_RENDERERS[category]
    return own.get(defect_type) or own[STAND_IN_DEFECTS[category][defect_type]]


MIN_SIZE = 32
# Every scene is rendered on a canvas that extends this fraction of the side beyond each edge of the saved image,
# which is the canvas's central crop. MVTec-Shift warps the canvas and crops back, so a pose change shows more of
# the same scene instead of an invented border; the margin covers the strongest geometric shift (see
# data_prep.shift.SEVERITY_TABLE, checked by a test).
CANVAS_MARGIN = 0.17
# Canvases lie beside the images in this hidden folder of each category, which the MVTec readers never open:
# <category>/.canvas/<split>/<defect>/<stem>.png, .canvas/ground_truth/<defect>/<stem>_mask.png, .canvas/canvas.json
CANVAS_FOLDER = ".canvas"
CANVAS_INFO = "canvas.json"
# Geometry is specified at this reference resolution and scaled, so a 64 px test image is a shrunken 256 px one.
REFERENCE_SIZE = 256
# A defect that cannot be placed (e.g. it fell outside the object) is re-drawn from the same stream; this many
# failures in a row means a bug, not bad luck.
MAX_PLACEMENT_ATTEMPTS = 25


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image; for a defect image also the clean image it was made from and the exact mask.

    A frame sample is ``size`` px square; a canvas sample (``render_sample(..., canvas=True)``) is
    ``size + 2 * canvas_margin(size)`` px square and holds the frame sample as its central crop.
    """

    image: np.ndarray  # uint8 (H, W, 3)
    clean: np.ndarray  # uint8 (H, W, 3): the same scene before the defect (equal to image for good samples)
    mask: np.ndarray | None  # bool (H, W), True exactly where image != clean; None for good samples


# ----------------------------------------------------------------------------------------------------------
# Seeding: every file has its own stream, so a file never depends on the order or number of the others.
# ----------------------------------------------------------------------------------------------------------

def _stable_id(name: str) -> int:
    # Python's hash() is salted per process; crc32 is the same on every run and machine.
    return zlib.crc32(name.encode("utf-8"))


def sample_rng(seed: int, category: str, split: str, defect_type: str, index: int) -> np.random.Generator:
    """The random stream of one file, keyed by (seed, category, split, defect type, index)."""
    key = [int(seed), _stable_id(category), _stable_id(split), _stable_id(defect_type), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


# ----------------------------------------------------------------------------------------------------------
# Shared drawing primitives (float32 images in [0, 1], all vectorised over pixels)
#
# ``size`` is always the side of the saved frame and all geometry is given in frame pixels; the arrays cover the
# whole canvas, whose pixel (i, j) sits at frame coordinates (i - margin, j - margin).
# ----------------------------------------------------------------------------------------------------------

def canvas_margin(size: int) -> int:
    """Pixels rendered beyond each edge of a ``size`` px frame."""
    return int(np.ceil(CANVAS_MARGIN * size))


def _canvas_side(size: int) -> int:
    return size + 2 * canvas_margin(size)


def crop_to_frame(array: np.ndarray, size: int) -> np.ndarray:
    """The saved frame (``size`` px square) of a canvas-sized array."""
    m = canvas_margin(size)
    return array[m:m + size, m:m + size]


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame coordinates (y, x) of every canvas pixel."""
    side, margin = _canvas_side(size), canvas_margin(size)
    y, x = (np.mgrid[0:side, 0:side] - margin).astype(np.float32)
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _cos_sin(angle: float) -> tuple[float, float]:
    # Plain floats: a NumPy float64 scalar would silently promote every float32 image it touches.
    return float(np.cos(angle)), float(np.sin(angle))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise over the canvas, rescaled to unit standard deviation."""
    side = _canvas_side(size)
    # Wide blurs are done on a coarser grid and upsampled: the same look at a fraction of the cost.
    factor = max(1, int(sigma // 3))
    coarse = side if factor == 1 else -(-side // factor) + 1
    field = ndimage.gaussian_filter(rng.standard_normal((coarse, coarse)).astype(np.float32), sigma / factor,
                                    mode="wrap")
    if factor > 1:
        field = ndimage.zoom(field, factor, order=1)[:side, :side]
    return field / max(float(field.std()), 1e-6)


def _lighting(rng: np.random.Generator, size: int, gain_range: tuple[float, float],
              max_gradient: float) -> np.ndarray:
    """Brightness gain times a linear gradient in a random direction: the illumination of one shot."""
    y, x = _pixel_grid(size)
    c, s = _cos_sin(rng.uniform(0, 2 * np.pi))
    strength = rng.uniform(0, max_gradient)
    ramp = (c * x + s * y) / size * 2 - (c + s)
    return (rng.uniform(*gain_range) * (1 + strength * ramp)).astype(np.float32)


@lru_cache(maxsize=4)
def _texture_source(name: str) -> np.ndarray:
    """A real greyscale texture shipped with scikit-image, standardised to zero mean and unit variance."""
    from skimage import data

    texture = getattr(data, name)().astype(np.float32)
    texture = (texture - texture.mean()) / texture.std()
    texture.flags.writeable = False
    return texture


def _texture_patch(rng: np.random.Generator, name: str, size: int, zoom: float) -> np.ndarray:
    """A randomly placed, rotated crop of a real texture; ``zoom`` = source pixels per output pixel."""
    source = _texture_source(name)
    y, x = _pixel_grid(size)
    c, s = _cos_sin(rng.uniform(0, 2 * np.pi))
    cy, cx = rng.uniform(0, source.shape[0]), rng.uniform(0, source.shape[1])
    yc, xc = y - size / 2, x - size / 2
    sy = cy + zoom * (yc * c - xc * s)
    sx = cx + zoom * (yc * s + xc * c)
    return ndimage.map_coordinates(source, [sy, sx], order=1, mode="mirror").astype(np.float32)


def _blob_depth(rng: np.random.Generator, size: int, centre: Sequence[float], radius: float,
                roughness: float = 0.25, elongation: float = 1.0) -> np.ndarray:
    """Signed distance-like field (pixels, positive inside) of an irregular blob with a wavy outline."""
    y, x = _pixel_grid(size)
    c, s = _cos_sin(rng.uniform(0, 2 * np.pi))
    dy, dx = y - float(centre[0]), x - float(centre[1])
    u = dx * c + dy * s
    v = (-dx * s + dy * c) * float(elongation)
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    harmonics = np.arange(1, 6, dtype=np.float32)
    amplitudes = rng.normal(0, roughness, harmonics.size).astype(np.float32) / harmonics
    phases = rng.uniform(0, 2 * np.pi, harmonics.size).astype(np.float32)
    wobble = np.tensordot(amplitudes, np.cos(harmonics[:, None, None] * theta + phases[:, None, None]), axes=1)
    outline = float(radius) * np.maximum(1 + wobble, 0.35)
    return (outline - r).astype(np.float32)


def _soft(depth: np.ndarray, feather: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return np.clip(depth / max(feather, 1e-3) + 0.5, 0, 1).astype(np.float32)


def _random_curve(rng: np.random.Generator, start: Sequence[float], length: float, n_points: int,
                  wiggle: float) -> np.ndarray:
    """Points (y, x) of a random walk in a random direction that drifts by ``wiggle`` radians per step."""
    headings = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, wiggle, n_points - 1))
    step = length / (n_points - 1)
    offsets = np.cumsum(np.stack([np.sin(headings), np.cos(headings)], axis=1) * step, axis=0)
    return np.vstack([np.asarray(start, dtype=np.float64)[None], np.asarray(start)[None] + offsets])


def _polyline_distance(size: int, points: np.ndarray, reach: float) -> np.ndarray:
    """Distance of every pixel to a polyline; ``inf`` beyond ``reach`` of its bounding box (saves time)."""
    side, margin = _canvas_side(size), canvas_margin(size)
    distance = np.full((side, side), np.inf, dtype=np.float32)
    lo = (np.floor(points.min(axis=0) - reach).astype(int) + margin).clip(0, side)
    hi = (np.ceil(points.max(axis=0) + reach + 1).astype(int) + margin).clip(0, side)
    if (hi <= lo).any():
        return distance
    y, x = _pixel_grid(size)
    py, px = y[lo[0]:hi[0], lo[1]:hi[1]], x[lo[0]:hi[0], lo[1]:hi[1]]
    best = np.full(py.shape, np.inf, dtype=np.float32)
    vertices = points.tolist()  # plain floats keep the pixel arrays in float32
    for (ay, ax), (by, bx) in zip(vertices[:-1], vertices[1:]):  # loop over segments, vectorised over pixels
        ey, ex = by - ay, bx - ax
        t = np.clip(((py - ay) * ey + (px - ax) * ex) / max(ey * ey + ex * ex, 1e-9), 0, 1)
        best = np.minimum(best, np.hypot(py - ay - t * ey, px - ax - t * ex))
    distance[lo[0]:hi[0], lo[1]:hi[1]] = best
    return distance


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Sizes spread evenly over orders of magnitude, so small and large defects are equally common."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


# ----------------------------------------------------------------------------------------------------------
# carpet: a knitted loop pile with yarn fibres, under varying light
# ----------------------------------------------------------------------------------------------------------

CARPET_RGB = np.array([0.58, 0.47, 0.39], dtype=np.float32)


@dataclass
class CarpetScene:
    image: np.ndarray
    unit: float  # pixels per reference pixel
    colour: np.ndarray


def _carpet_scene(rng: np.random.Generator, size: int) -> CarpetScene:
    unit = size / REFERENCE_SIZE
    y, x = _pixel_grid(size)
    period = 9.0 * unit * rng.uniform(0.95, 1.05)
    angle = rng.normal(0, np.deg2rad(2.0))
    c, s = _cos_sin(angle)
    u = (x * c + y * s) / period + rng.uniform(0, 1)
    v = (-x * s + y * c) / period + rng.uniform(0, 1)
    row = np.floor(v)
    # Alternate rows are offset by half a loop, as in a knitted pile.
    u = u + 0.5 * (row % 2)
    col = np.floor(u)
    fu, fv = u - col - 0.5, v - row - 0.5
    # Each loop gets its own lean and brightness: real yarn loops are never identical.
    table = rng.standard_normal((2, 64, 64)).astype(np.float32)
    ri, ci = row.astype(np.int64) % 64, col.astype(np.int64) % 64
    lean = 0.35 * table[0][ri, ci]
    loops = np.exp(-((fu + lean * fv) ** 2 / 0.10 + fv ** 2 / 0.18)) * (1 + 0.18 * table[1][ri, ci])
    fibres = _texture_patch(rng, "grass", size, zoom=rng.uniform(0.5, 0.7) / unit)
    grain = _smooth_noise(rng, size, 0.6 * unit)
    mottling = _smooth_noise(rng, size, 20 * unit)
    luminance = 0.62 * loops + 0.10 * fibres + 0.05 * grain + 0.04 * mottling
    colour = CARPET_RGB * (1 + rng.normal(0, 0.025, 3)).astype(np.float32)
    light = _lighting(rng, size, (0.85, 1.15), 0.15)
    image = colour * ((0.55 + 0.75 * luminance) * light)[..., None]
    return CarpetScene(image=image.astype(np.float32), unit=unit, colour=colour)


def _carpet_color(rng: np.random.Generator, scene: CarpetScene, size: int):
    area = _log_uniform(rng, 0.01, 0.10) * size * size
    elongation = rng.uniform(1.0, 2.2)
    radius = float(np.sqrt(area * elongation / np.pi))
    centre = rng.uniform(0.1 * size, 0.9 * size, 2)
    depth = _blob_depth(rng, size, centre, radius, roughness=0.3, elongation=elongation)
    # Stains fade out towards their edge rather than ending in a hard line.
    alpha = np.clip(depth / (0.35 * radius), 0, 1) ** 0.7
    strength = rng.uniform(0.06, 0.40)
    tint = rng.normal(0, 1, 3).astype(np.float32)
    tint = tint / np.abs(tint).max()
    defective = scene.image * (1 + strength * alpha[..., None] * tint)
    return defective, alpha > 0.02


def _carpet_hole(rng: np.random.Generator, scene: CarpetScene, size: int):
    area = _log_uniform(rng, 0.004, 0.05) * size * size
    radius = float(np.sqrt(area / np.pi))
    centre = rng.uniform(0.1 * size, 0.9 * size, 2)
    depth = _blob_depth(rng, size, centre, radius, roughness=0.35)
    hole = _soft(depth, 1.5 * scene.unit)
    rim_width = 3.0 * scene.unit
    rim = _soft(depth + rim_width, 2.0 * scene.unit) - hole
    y, x = _pixel_grid(size)
    # The exposed backing is a dark woven grid, not a flat colour.
    pitch = 4.0 * scene.unit
    backing_grid = 0.5 + 0.25 * (np.cos(2 * np.pi * y / pitch) + np.cos(2 * np.pi * x / pitch))
    backing = scene.colour * 0.35 * (0.6 + 0.4 * backing_grid)[..., None]
    depth_of_hole = rng.uniform(0.35, 0.95)
    mix = (hole * depth_of_hole)[..., None]
    defective = scene.image * (1 - mix) + backing * mix
    defective = defective * (1 + 0.12 * depth_of_hole * rim[..., None])  # frayed, lifted fibres at the rim
    return defective, (hole + rim) > 0.02


def _carpet_thread(rng: np.random.Generator, scene: CarpetScene, size: int):
    length = rng.uniform(0.2, 0.6) * size
    start = rng.uniform(0.15 * size, 0.85 * size, 2)
    points = _random_curve(rng, start, length, n_points=24, wiggle=0.22)
    width = rng.uniform(1.3, 3.0) * scene.unit
    distance = _polyline_distance(size, points, reach=width + 3 * scene.unit)
    core = _soft(width / 2 - distance, 0.8 * scene.unit)
    halo = _soft(width / 2 + 1.5 * scene.unit - distance, 1.0 * scene.unit) - core
    roundness = np.sqrt(np.clip(1 - (distance / (width / 2 + 1e-3)) ** 2, 0, 1))
    contrast = rng.uniform(0.15, 0.8)
    hue = rng.normal(0, 1, 3).astype(np.float32)
    thread_colour = np.clip(scene.colour * (1 + contrast * hue / np.abs(hue).max()), 0.02, 1)
    thread = thread_colour * (0.75 + 0.35 * roundness)[..., None]
    defective = scene.image * (1 - core[..., None]) + thread * core[..., None]
    defective = defective * (1 - 0.25 * contrast * halo[..., None])  # the loose thread casts a thin shadow
    return defective, (core + halo) > 0.02


# ----------------------------------------------------------------------------------------------------------
# hazelnut: a shaded, striped brown nut in a random pose on a dark background
# ----------------------------------------------------------------------------------------------------------

HAZELNUT_RGB = np.array([0.55, 0.33, 0.16], dtype=np.float32)


@dataclass
class HazelnutScene:
    image: np.ndarray
    unit: float
    coverage: np.ndarray  # (H, W) how much of each pixel the nut covers
    centre: np.ndarray  # (y, x)
    semi_axes: tuple[float, float]  # long, short
    angle: float


def _hazelnut_scene(rng: np.random.Generator, size: int) -> HazelnutScene:
    unit = size / REFERENCE_SIZE
    y, x = _pixel_grid(size)
    centre = size / 2 + np.clip(rng.normal(0, 0.04 * size, 2), -0.08 * size, 0.08 * size)
    angle = rng.uniform(0, 2 * np.pi)
    long_axis = 0.29 * size * rng.uniform(0.9, 1.05)
    short_axis = long_axis * rng.uniform(0.82, 0.92)
    c, s = _cos_sin(angle)
    dy, dx = y - float(centre[0]), x - float(centre[1])
    along = (dx * c + dy * s) / long_axis
    across = (-dx * s + dy * c) / (short_axis * (1 - 0.13 * np.clip(along, -1, 1)))
    radius2 = along ** 2 + across ** 2
    coverage = _soft((1 - np.sqrt(radius2)) * short_axis, 1.2 * unit)
    # Ellipsoid normals, rotated back to the image frame, lit from a jittered top-left light.
    nz = np.sqrt(np.clip(1 - radius2, 0, 1))
    nx = along * c - across * s
    ny = along * s + across * c
    norm = np.sqrt(nx ** 2 + ny ** 2 + nz ** 2) + 1e-6
    light = np.array([-0.45, -0.5, 0.75]) + rng.normal(0, 0.12, 3)
    light = (light / np.linalg.norm(light)).tolist()
    diffuse = np.clip((nx * light[0] + ny * light[1] + nz * light[2]) / norm, 0, 1)
    half = np.array(light) + np.array([0, 0, 1.0])
    half = (half / np.linalg.norm(half)).tolist()
    specular = np.clip((nx * half[0] + ny * half[1] + nz * half[2]) / norm, 0, 1) ** 24
    # Stripes run from the base to the tip, converging at both ends like a hazelnut's veins.
    latitude = np.clip(across / np.sqrt(np.clip(1 - along ** 2, 0.04, 1)), -1.2, 1.2)
    stripe_profile = ndimage.gaussian_filter1d(rng.standard_normal(90), 1.0)
    stripes = np.interp(latitude, np.linspace(-1.2, 1.2, stripe_profile.size), stripe_profile).astype(np.float32)
    grain = _smooth_noise(rng, size, 1.0 * unit)
    blotches = _smooth_noise(rng, size, 8 * unit)
    colour = HAZELNUT_RGB * (1 + rng.normal(0, 0.05, 3)).astype(np.float32)
    albedo = 1 + 0.13 * stripes + 0.05 * grain + 0.06 * blotches
    nut = colour * ((0.22 + 0.9 * diffuse) * albedo)[..., None] + 0.22 * specular[..., None]
    # The rough, pale base (hilum) at the blunt end.
    hilum_distance = np.hypot((along + 1.0) / 0.32, across / 0.6)
    hilum = np.clip((1 - hilum_distance) * 3 + 0.6 * grain, 0, 1) * (hilum_distance < 1.4)
    hilum_shading = (0.3 + 0.8 * diffuse) * (1 + 0.15 * grain)
    hilum_rgb = np.array([0.62, 0.52, 0.40], dtype=np.float32) * hilum_shading[..., None]
    nut = nut * (1 - hilum[..., None]) + hilum_rgb * hilum[..., None]
    background = (0.06 + 0.012 * _smooth_noise(rng, size, 3 * unit) + 0.01 * _smooth_noise(rng, size, 30 * unit))
    background = np.repeat(background[..., None], 3, axis=2) * np.array([0.95, 0.97, 1.05], dtype=np.float32)
    # Soft shadow thrown away from the light.
    shadow_centre = centre - 0.05 * size * np.array([light[1], light[0]]) / max(np.hypot(light[0], light[1]), 1e-3)
    sdy, sdx = y - float(shadow_centre[0]), x - float(shadow_centre[1])
    shadow_r = np.hypot((sdx * c + sdy * s) / long_axis, (-sdx * s + sdy * c) / short_axis)
    shadow = _soft((1.05 - shadow_r) * short_axis, 14 * unit) * 0.6
    background = background * (1 - shadow[..., None])
    image = background * (1 - coverage[..., None]) + nut * coverage[..., None]
    image = image * _lighting(rng, size, (0.88, 1.12), 0.08)[..., None]
    return HazelnutScene(image=image.astype(np.float32), unit=unit, coverage=coverage, centre=centre,
                         semi_axes=(long_axis, short_axis), angle=angle)


def _point_on_nut(rng: np.random.Generator, scene: HazelnutScene, max_radius: float) -> np.ndarray:
    """A random (y, x) inside the nut, at most ``max_radius`` of the way to its outline."""
    r = max_radius * np.sqrt(rng.uniform(0, 1))
    phi = rng.uniform(0, 2 * np.pi)
    along, across = r * np.cos(phi) * scene.semi_axes[0], r * np.sin(phi) * scene.semi_axes[1]
    c, s = _cos_sin(scene.angle)
    return scene.centre + np.array([along * s + across * c, along * c - across * s])


def _hazelnut_crack(rng: np.random.Generator, scene: HazelnutScene, size: int):
    length = rng.uniform(0.4, 1.1) * scene.semi_axes[0]
    points = _random_curve(rng, _point_on_nut(rng, scene, 0.6), length, n_points=16, wiggle=0.45)
    width = rng.uniform(1.2, 3.6) * scene.unit
    distance = _polyline_distance(size, points, reach=width + 3 * scene.unit)
    if rng.uniform() < 0.5:  # a side branch, as real cracks fork
        fork = points[rng.integers(3, len(points) - 3)]
        branch = _random_curve(rng, fork, 0.4 * length, n_points=8, wiggle=0.5)
        branch_distance = _polyline_distance(size, branch, reach=width + 3 * scene.unit) + 0.3 * width
        distance = np.minimum(distance, branch_distance)
    gap = _soft(width / 2 - distance, 0.7 * scene.unit) * scene.coverage
    edge = (_soft(width / 2 + 2.5 * scene.unit - distance, 1.0 * scene.unit) * scene.coverage) - gap
    darkness = rng.uniform(0.2, 0.9)
    defective = scene.image * (1 - 0.85 * darkness * gap[..., None])
    defective = defective * (1 + 0.15 * darkness * edge[..., None])  # broken shell edges catch the light
    return defective, ((gap + edge) > 0.02) & (scene.coverage > 0.5)


def _hazelnut_hole(rng: np.random.Generator, scene: HazelnutScene, size: int):
    radius = float(np.sqrt(_log_uniform(rng, 0.005, 0.05) * size * size / np.pi))
    centre = _point_on_nut(rng, scene, 0.65)
    depth = _blob_depth(rng, size, centre, radius, roughness=0.15, elongation=rng.uniform(1.0, 1.4))
    hole = _soft(depth, 1.2 * scene.unit) * scene.coverage
    rim = _soft(depth + 2.0 * scene.unit, 1.2 * scene.unit) * scene.coverage - hole
    # Inside, the far wall is lit and the near wall is in shadow: a gradient across the hole.
    y, x = _pixel_grid(size)
    wall = np.clip(0.5 + 0.5 * ((y - float(centre[0])) + (x - float(centre[1]))) / radius, 0, 1)
    cavity = np.array([0.10, 0.07, 0.04], np.float32) + np.array([0.12, 0.1, 0.07], np.float32) * wall[..., None]
    severity = rng.uniform(0.3, 1.0)
    mix = (hole * severity)[..., None]
    defective = scene.image * (1 - mix) + cavity * mix
    # The broken shell around the hole is pale; a shallow hole shows less of it.
    shell = np.array([0.78, 0.62, 0.42], dtype=np.float32)
    rim_mix = (0.6 * severity * rim)[..., None]
    defective = defective * (1 - rim_mix) + shell * rim_mix
    return defective, ((hole + rim) > 0.02) & (scene.coverage > 0.5)


def _hazelnut_print(rng: np.random.Generator, scene: HazelnutScene, size: int):
    inks = np.array([[0.60, 0.08, 0.12], [0.18, 0.12, 0.55], [0.08, 0.08, 0.08], [0.10, 0.40, 0.15]],
                    dtype=np.float32)
    ink = inks[rng.integers(len(inks))]
    anchor = _point_on_nut(rng, scene, 0.5)
    width = rng.uniform(1.8, 4.5) * scene.unit
    distance = np.full((_canvas_side(size),) * 2, np.inf, dtype=np.float32)
    # A few short strokes near each other read as a stamped mark or letters.
    for _ in range(rng.integers(3, 8)):
        start = anchor + rng.normal(0, 0.25 * scene.semi_axes[1], 2)
        stroke = _random_curve(rng, start, rng.uniform(0.15, 0.45) * scene.semi_axes[0], n_points=6, wiggle=0.5)
        distance = np.minimum(distance, _polyline_distance(size, stroke, reach=width + 2 * scene.unit))
    coverage = _soft(width / 2 - distance, 0.8 * scene.unit) * scene.coverage
    opacity = rng.uniform(0.12, 0.85)
    # Ink is absorbed by the shell, so it keeps the nut's shading (multiply blend).
    luminance = scene.image.mean(axis=2, keepdims=True) / max(float(HAZELNUT_RGB.mean()), 1e-3)
    mix = (coverage * opacity)[..., None]
    defective = scene.image * (1 - mix) + ink * np.clip(luminance, 0.2, 1.5) * mix
    return defective, (coverage > 0.02) & (scene.coverage > 0.5)


# ----------------------------------------------------------------------------------------------------------
# zipper: a vertical zipper (two interlocking rows of teeth on woven tape), greyscale like MVTec's zipper
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ZipperTeeth:
    """Per-tooth parameters of one side; defects edit these and the scene is rendered again."""

    v_offset: np.ndarray  # shift along the zipper, pixels
    tilt: np.ndarray  # rotation about the tooth root, radians
    length: np.ndarray  # fraction of the tooth left after a break (1 intact, 0 missing)
    brightness: np.ndarray
    break_phase: np.ndarray  # shape of the jagged end of a broken tooth


@dataclass
class ZipperScene:
    image: np.ndarray
    unit: float
    centre_x: float
    angle: float
    period: float
    phase: float
    fabric: np.ndarray  # (H, W) grey tape texture before lighting
    light: np.ndarray  # (H, W)
    teeth: dict  # side (-1 left, +1 right) -> ZipperTeeth
    first_tooth: int  # tooth index of table entry 0
    tooth_coverage: np.ndarray  # (H, W) how much of each pixel is covered by teeth


def _zipper_geometry(size: int, centre_x: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates across and along the zipper, centred on the chain."""
    y, x = _pixel_grid(size)
    dx, dy = x - centre_x, y - size / 2
    c, s = _cos_sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _zipper_scene(rng: np.random.Generator, size: int) -> ZipperScene:
    unit = size / REFERENCE_SIZE
    centre_x = size / 2 + float(np.clip(rng.normal(0, 0.015 * size), -0.04 * size, 0.04 * size))
    angle = float(np.clip(rng.normal(0, np.deg2rad(1.0)), -np.deg2rad(3), np.deg2rad(3)))
    period = size / 11.0 * rng.uniform(0.97, 1.03)
    phase = rng.uniform(0, period)
    across, along = _zipper_geometry(size, centre_x, angle)
    # Plain-weave tape: a fine crossed thread pattern plus uneven yarn.
    pitch = 3.2 * unit
    weave = np.cos(2 * np.pi * across / pitch) * np.cos(2 * np.pi * along / pitch)
    fabric = (0.42 + 0.05 * weave + 0.025 * _smooth_noise(rng, size, 0.7 * unit)
              + 0.02 * _smooth_noise(rng, size, 12 * unit)) * rng.uniform(0.95, 1.05)
    # A stitched seam on each side of the chain.
    seam_u = 0.33 * size
    stitch = (np.cos(2 * np.pi * along / (7 * unit)) > 0.0).astype(np.float32)
    for side in (-1, 1):
        seam = _soft(1.2 * unit - np.abs(across - side * seam_u), 0.8 * unit) * stitch
        fabric = fabric * (1 - 0.3 * seam)
    # Enough teeth to run along the whole canvas, which a rotation of up to 3 degrees spans by 1.05 x its side.
    n_teeth = int(np.ceil(1.2 * _canvas_side(size) / period)) + 6
    first_tooth = -n_teeth // 2
    teeth = {side: ZipperTeeth(v_offset=rng.normal(0, 0.015 * period, n_teeth).astype(np.float32),
                               tilt=rng.normal(0, np.deg2rad(0.7), n_teeth).astype(np.float32),
                               length=np.ones(n_teeth, np.float32),
                               brightness=rng.normal(1, 0.03, n_teeth).astype(np.float32),
                               break_phase=rng.uniform(0, 2 * np.pi, n_teeth).astype(np.float32))
             for side in (-1, 1)}
    light = _lighting(rng, size, (0.85, 1.15), 0.12)
    scene = ZipperScene(image=np.empty(0), unit=unit, centre_x=centre_x, angle=angle, period=period,
                        phase=phase, fabric=fabric.astype(np.float32), light=light, teeth=teeth,
                        first_tooth=first_tooth, tooth_coverage=np.empty(0))
    return _render_zipper(scene, size)


def _render_zipper(scene: ZipperScene, size: int) -> ZipperScene:
    """Composite the teeth of both sides over the tape; deterministic given the scene's parameters."""
    unit, period = scene.unit, scene.period
    across, along = _zipper_geometry(size, scene.centre_x, scene.angle)
    reach = 0.15 * size  # from the tape edge to the centre line
    overlap = 0.035 * size  # how far a tooth's head crosses the centre line to interlock
    half_height = 0.27 * period
    full_length = reach + overlap
    # Only the columns around the chain can hold teeth or their shadows: draw there, leave the tape elsewhere.
    columns = np.flatnonzero((np.abs(across) < reach + overlap + 6 * unit).any(axis=0))
    band = slice(columns[0], columns[-1] + 1)
    across, along = across[:, band], along[:, band]
    grey = scene.fabric.copy()
    chain = grey[:, band]
    coverage_total = np.zeros_like(chain)
    for side in (-1, 1):
        table = scene.teeth[side]
        # q runs from a tooth's root (-reach) to its head (+overlap) on either side.
        root_distance = -side * across + reach
        side_phase = scene.phase + (0.0 if side < 0 else 0.5 * period)
        nearest = np.rint((along - side_phase) / period)
        # Neighbouring teeth are drawn too, so a shifted or tilted tooth is not clipped at its cell edge.
        for offset in (-1, 0, 1):
            k = nearest + offset
            idx = np.clip(k.astype(np.int64) - scene.first_tooth, 0, len(table.length) - 1)
            dv = along - (side_phase + k * period) - table.v_offset[idx]
            cos_t, sin_t = np.cos(table.tilt)[idx], np.sin(table.tilt)[idx]
            qr = root_distance * cos_t + dv * sin_t
            vr = -root_distance * sin_t + dv * cos_t
            along_tooth = ((qr - full_length / 2) / (full_length / 2)) ** 2
            across_tooth = (vr / half_height) ** 2
            # A broken tooth loses everything beyond a jagged fracture line; its root part stays untouched.
            length = table.length[idx]
            fracture = length * full_length + 1.2 * unit * np.sin(vr / (1.3 * unit) + table.break_phase[idx])
            kept = np.where(length < 1, _soft(fracture - qr, 0.8 * unit), 1.0) * (length > 0)
            tooth = _soft((1 - along_tooth ** 3 - across_tooth ** 2) * half_height * 0.5, 0.8 * unit) * kept
            roundness = np.sqrt(np.clip(1 - across_tooth, 0, 1))
            highlight = np.exp(-((vr + 0.35 * half_height) / (0.2 * half_height)) ** 2)
            tooth_grey = 0.80 * table.brightness[idx] * (0.55 + 0.35 * roundness + 0.25 * highlight)
            # Each tooth darkens the tape just below it (light from above).
            below = ((vr - 2.5 * unit) / half_height) ** 2
            shadow = _soft((1 - along_tooth ** 3 - below ** 2) * half_height * 0.5, 2.0 * unit) * kept
            chain = chain * (1 - 0.35 * shadow * (1 - coverage_total))
            chain = chain * (1 - tooth) + tooth_grey * tooth
            coverage_total = np.maximum(coverage_total, tooth)
    grey[:, band] = chain
    tooth_coverage = np.zeros_like(grey)
    tooth_coverage[:, band] = coverage_total
    image = np.repeat((grey * scene.light)[..., None], 3, axis=2).astype(np.float32)
    scene.image, scene.tooth_coverage = image, tooth_coverage
    return scene


def _copy_teeth(scene: ZipperScene) -> dict:
    return {side: ZipperTeeth(**{name: getattr(t, name).copy() for name in t.__dataclass_fields__})
            for side, t in scene.teeth.items()}


def _visible_tooth_range(rng: np.random.Generator, scene: ZipperScene, size: int, count: int) -> np.ndarray:
    """Table indices of ``count`` consecutive teeth near the middle of the image."""
    first_visible = int(np.ceil((-0.3 * size - scene.phase) / scene.period))
    last_visible = int(np.floor((0.3 * size - scene.phase) / scene.period)) - count + 1
    start = rng.integers(first_visible, max(last_visible, first_visible) + 1)
    return np.arange(start, start + count) - scene.first_tooth


def _rerendered(scene: ZipperScene, teeth: dict, size: int):
    """Render the scene again with edited teeth; the region is every changed pixel, closed into solid shapes
    (a shifted tooth changes its outline but not its flat middle, which would leave a hollow mask)."""
    edited = ZipperScene(**{**scene.__dict__, "teeth": teeth})
    defective = _render_zipper(edited, size).image
    changed = (_to_uint8(defective) != _to_uint8(scene.image)).any(axis=2)
    closed = ndimage.binary_closing(changed, iterations=max(1, round(2 * scene.unit)), border_value=0)
    return defective, ndimage.binary_fill_holes(closed | changed)


def _zipper_broken_teeth(rng: np.random.Generator, scene: ZipperScene, size: int):
    teeth = _copy_teeth(scene)
    side = int(rng.choice([-1, 1]))
    count = int(rng.integers(1, 4))
    for idx in _visible_tooth_range(rng, scene, size, count):
        # From a chipped head (subtle) to a missing tooth (obvious).
        teeth[side].length[idx] = 0.0 if rng.uniform() < 0.3 else rng.uniform(0.35, 0.9)
    return _rerendered(scene, teeth, size)


def _zipper_squeezed_teeth(rng: np.random.Generator, scene: ZipperScene, size: int):
    teeth = _copy_teeth(scene)
    side = int(rng.choice([-1, 1]))
    count = int(rng.integers(2, 5))
    indices = _visible_tooth_range(rng, scene, size, count)
    severity = rng.uniform(0.3, 1.0)
    # Teeth pushed towards each other along the zipper, and bent a little.
    squeeze = np.linspace(1, -1, count) * severity * 0.16 * scene.period
    teeth[side].v_offset[indices] += squeeze.astype(np.float32)
    teeth[side].tilt[indices] += rng.normal(0, np.deg2rad(5.0) * severity, count).astype(np.float32)
    return _rerendered(scene, teeth, size)


def _zipper_fabric_interior(rng: np.random.Generator, scene: ZipperScene, size: int):
    area = _log_uniform(rng, 0.005, 0.05) * size * size
    elongation = rng.uniform(1.0, 2.0)
    radius = float(np.sqrt(area * elongation / np.pi))
    side = rng.choice([-1, 1])
    across = side * rng.uniform(0.24, 0.42) * size
    along = rng.uniform(-0.35, 0.35) * size
    c, s = _cos_sin(scene.angle)
    centre = (size / 2 + across * s + along * c, scene.centre_x + across * c - along * s)
    depth = _blob_depth(rng, size, centre, radius, roughness=0.3, elongation=elongation)
    alpha = np.clip(depth / (0.3 * radius), 0, 1) * np.clip(1 - 4 * scene.tooth_coverage, 0, 1)
    # A rubbed or soiled patch: the weave is flattened (blurred) and darker or lighter.
    flattened = ndimage.gaussian_filter(scene.image, (1.2 * scene.unit, 1.2 * scene.unit, 0))
    change = rng.uniform(0.05, 0.35) * float(rng.choice([-1.0, 1.0], p=[0.7, 0.3]))
    target = flattened * (1 + change)
    defective = scene.image * (1 - alpha[..., None]) + target * alpha[..., None]
    return defective, alpha > 0.02



# ----------------------------------------------------------------------------------------------------------
# rug (look-alike of carpet): a twill weave of flat yarn in a greyer colour, with carpet's fibres and light
# ----------------------------------------------------------------------------------------------------------

RUG_RGB = np.array([0.52, 0.47, 0.43], dtype=np.float32)


def _rug_scene(rng: np.random.Generator, size: int) -> CarpetScene:
    unit = size / REFERENCE_SIZE
    y, x = _pixel_grid(size)
    period = 8.0 * unit * rng.uniform(0.95, 1.05)
    c, s = _cos_sin(rng.normal(0, np.deg2rad(2.0)))
    u = (x * c + y * s) / period + rng.uniform(0, 1)
    v = (-x * s + y * c) / period + rng.uniform(0, 1)
    col, row = np.floor(u), np.floor(v)
    fu, fv = u - col - 0.5, v - row - 0.5
    # A 2/1 twill: the warp floats over two wefts and under one, one step further along on every row, which
    # draws the diagonal ribs of the weave; a float is rounded across its yarn and darker where it dives.
    warp_up = ((col + row) % 3) != 0
    warp = np.cos(np.pi * fu) ** 2 * (0.85 + 0.15 * np.cos(np.pi * fv))
    weft = np.cos(np.pi * fv) ** 2 * (0.85 + 0.15 * np.cos(np.pi * fu))
    table = rng.standard_normal((64, 64)).astype(np.float32)
    unevenness = table[row.astype(np.int64) % 64, col.astype(np.int64) % 64]
    yarn = np.where(warp_up, warp, 0.8 * weft) * (1 + 0.12 * unevenness)
    fibres = _texture_patch(rng, "grass", size, zoom=rng.uniform(0.5, 0.7) / unit)
    grain = _smooth_noise(rng, size, 0.6 * unit)
    mottling = _smooth_noise(rng, size, 20 * unit)
    luminance = 0.58 * yarn + 0.10 * fibres + 0.05 * grain + 0.04 * mottling
    colour = RUG_RGB * (1 + rng.normal(0, 0.025, 3)).astype(np.float32)
    light = _lighting(rng, size, (0.85, 1.15), 0.15)
    image = colour * ((0.6 + 0.75 * luminance) * light)[..., None]
    return CarpetScene(image=image.astype(np.float32), unit=unit, colour=colour)


# ----------------------------------------------------------------------------------------------------------
# walnut (look-alike of hazelnut): a rounder, paler nut with a wrinkled shell and a seam, on the same dark ground
# ----------------------------------------------------------------------------------------------------------

WALNUT_RGB = np.array([0.62, 0.45, 0.28], dtype=np.float32)


def _walnut_scene(rng: np.random.Generator, size: int) -> HazelnutScene:
    unit = size / REFERENCE_SIZE
    y, x = _pixel_grid(size)
    centre = size / 2 + np.clip(rng.normal(0, 0.04 * size, 2), -0.08 * size, 0.08 * size)
    angle = rng.uniform(0, 2 * np.pi)
    long_axis = 0.30 * size * rng.uniform(0.92, 1.04)
    short_axis = long_axis * rng.uniform(0.86, 0.95)
    c, s = _cos_sin(angle)
    dy, dx = y - float(centre[0]), x - float(centre[1])
    along = (dx * c + dy * s) / long_axis
    across = (-dx * s + dy * c) / short_axis
    radius2 = along ** 2 + across ** 2
    coverage = _soft((1 - np.sqrt(radius2)) * short_axis, 1.2 * unit)
    nz = np.sqrt(np.clip(1 - radius2, 0, 1))
    nx = along * c - across * s
    ny = along * s + across * c
    norm = np.sqrt(nx ** 2 + ny ** 2 + nz ** 2) + 1e-6
    light = np.array([-0.45, -0.5, 0.75]) + rng.normal(0, 0.12, 3)
    light = (light / np.linalg.norm(light)).tolist()
    diffuse = np.clip((nx * light[0] + ny * light[1] + nz * light[2]) / norm, 0, 1)
    # Wrinkles: the ridges of a smooth random field (where it crosses zero) are the shell's raised folds.
    field = _smooth_noise(rng, size, 3.5 * unit)
    ridges = np.exp(-(field / 0.35) ** 2)
    grain = _smooth_noise(rng, size, 1.0 * unit)
    # The seam where the two halves of the shell meet runs along the long axis.
    seam = np.exp(-(across / 0.05) ** 2) * (np.abs(along) < 0.97)
    colour = WALNUT_RGB * (1 + rng.normal(0, 0.05, 3)).astype(np.float32)
    albedo = 1 + 0.22 * ridges - 0.10 * (1 - ridges) + 0.05 * grain - 0.25 * seam
    nut = colour * ((0.25 + 0.85 * diffuse) * albedo)[..., None]
    background = (0.06 + 0.012 * _smooth_noise(rng, size, 3 * unit) + 0.01 * _smooth_noise(rng, size, 30 * unit))
    background = np.repeat(background[..., None], 3, axis=2) * np.array([0.95, 0.97, 1.05], dtype=np.float32)
    shadow_centre = centre - 0.05 * size * np.array([light[1], light[0]]) / max(np.hypot(light[0], light[1]), 1e-3)
    sdy, sdx = y - float(shadow_centre[0]), x - float(shadow_centre[1])
    shadow_r = np.hypot((sdx * c + sdy * s) / long_axis, (-sdx * s + sdy * c) / short_axis)
    shadow = _soft((1.05 - shadow_r) * short_axis, 14 * unit) * 0.6
    background = background * (1 - shadow[..., None])
    image = background * (1 - coverage[..., None]) + nut * coverage[..., None]
    image = image * _lighting(rng, size, (0.88, 1.12), 0.08)[..., None]
    return HazelnutScene(image=image.astype(np.float32), unit=unit, coverage=coverage, centre=centre,
                         semi_axes=(long_axis, short_axis), angle=angle)


# ----------------------------------------------------------------------------------------------------------
# Rendering one sample and writing the dataset
# ----------------------------------------------------------------------------------------------------------

SCENES: dict[str, Callable] = {"carpet": _carpet_scene, "hazelnut": _hazelnut_scene, "zipper": _zipper_scene,
                                "rug": _rug_scene, "walnut": _walnut_scene}
DEFECT_RENDERERS: dict[str, dict[str, Callable]] = {
    "carpet": {"color": _carpet_color, "hole": _carpet_hole, "thread": _carpet_thread},
    "hazelnut": {"crack": _hazelnut_crack, "hole": _hazelnut_hole, "print": _hazelnut_print},
    "zipper": {"broken_teeth": _zipper_broken_teeth, "fabric_interior": _zipper_fabric_interior,
               "squeezed_teeth": _zipper_squeezed_teeth},
    # The look-alikes' scenes carry their twins' scene fields, so their twins' defects render on them.
    "rug": {"color": _carpet_color, "hole": _carpet_hole, "thread": _carpet_thread},
    "walnut": {"crack": _hazelnut_crack, "hole": _hazelnut_hole, "print": _hazelnut_print},
}


def _apply_defect(clean: np.ndarray, defective: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Copy the defect into the clean uint8 image inside ``region`` only, and make sure every region pixel
    changes: a faint blend can round back to the clean value, and the mask must equal the changed pixels."""
    image = clean.copy()
    image[region] = _to_uint8(defective)[region]
    unchanged = region & (image == clean).all(axis=2)
    if unchanged.any():
        intended = (defective[unchanged] * 255.0 - clean[unchanged]).sum(axis=1)
        step = np.where(intended < 0, -1, 1)[:, None]
        before = clean[unchanged].astype(np.int16)
        # Step away from the clean value, turning round where a channel is already at 0 or 255.
        nudged = np.where((before + step < 0) | (before + step > 255), before - step, before + step)
        image[unchanged] = nudged.astype(np.uint8)
    return image


def _place_defect(rng: np.random.Generator, scene, clean: np.ndarray, render: Callable,
                  size: int) -> SyntheticSample | None:
    for _ in range(MAX_PLACEMENT_ATTEMPTS):
        defective, region = render(rng, scene, size)
        if crop_to_frame(region, size).any():  # a defect that lies wholly in the margin is drawn again
            return SyntheticSample(image=_apply_defect(clean, defective, region), clean=clean, mask=region)
    return None


def render_sample(category: str, defect_type: str = "good", index: int = 0, seed: int = 0, size: int = 256,
                  split: str = "test", canvas: bool = False) -> SyntheticSample:
    """Render one image (and its mask) exactly as :func:`generate` writes it.

    With ``canvas=True`` the wider canvas is returned, whose central crop (:func:`crop_to_frame`) is the image.
    A defect may reach into the margin where it lies at the edge of the frame, but always shows in the frame.
    """
    if category not in SCENES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(ALL_CATEGORIES)}")
    if defect_type != "good" and defect_type not in defect_types(category):
        raise ValueError(f"category {category!r} has no defect {defect_type!r}; "
                         f"known: {', '.join(defect_types(category))}")
    if split == "train" and defect_type != "good":
        raise ValueError("the train split holds only good images")
    rng = sample_rng(seed, category, split, defect_type, index)
    scene = SCENES[category](rng, size)
    clean = _to_uint8(scene.image)
    if defect_type == "good":
        sample = SyntheticSample(image=clean, clean=clean, mask=None)
    else:
        sample = _place_defect(rng, scene, clean, _renderer(category, defect_type), size)
        if sample is None:
            raise RuntimeError(f"could not place a {defect_type} defect on {category} image {index} (seed {seed})")
    if canvas:
        return sample
    return SyntheticSample(*(None if a is None else crop_to_frame(a, size).copy()
                             for a in (sample.image, sample.clean, sample.mask)))


def _save_png(array: np.ndarray, path: Path) -> None:
    # PIL writes no timestamp or other metadata chunk unless asked, so equal arrays give equal bytes.
    # Level 1 is four times faster than the default 6 and, on these noisy images, barely larger.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _file_stem(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _greyscale(image: np.ndarray) -> np.ndarray:
    """The single channel of an image whose three channels are equal (a zipper is rendered so); refuses any other."""
    if not (image[..., :1] == image).all():
        raise ValueError("a greyscale image was asked for, but the rendered channels differ")
    return image[..., 0]


def _write_category(folder: Path, category: str, seed: int, size: int, n_train: int, n_test_good: int,
                    n_per_defect: int, test: dict[str, int] | None = None, greyscale: bool = False) -> None:
    """The MVTec-layout images and masks, and under ``.canvas`` the same tree at canvas size. ``test`` (images per
    type, ``good`` included) replaces ``n_test_good`` and ``n_per_defect``; ``greyscale`` saves single-channel
    images."""
    plan = [("train", "good", n_train), ("test", "good", n_test_good)]
    plan += [("test", defect, n_per_defect) for defect in defects_of(category)]
    if test is not None:
        plan = [("train", "good", n_train)] + [("test", name, count) for name, count in test.items()]
    channels = _greyscale if greyscale else (lambda image: image)
    for split, defect, count in plan:
        for base in (folder, folder / CANVAS_FOLDER):
            (base / split / defect).mkdir(parents=True)
            if defect != "good":
                (base / "ground_truth" / defect).mkdir(parents=True)
        for index in range(count):
            canvas = render_sample(category, defect, index, seed=seed, size=size, split=split, canvas=True)
            stem = _file_stem(index, count)
            for base, crop in ((folder, lambda a: crop_to_frame(a, size)), (folder / CANVAS_FOLDER, lambda a: a)):
                _save_png(channels(crop(canvas.image)), base / split / defect / f"{stem}.png")
                if canvas.mask is not None:
                    _save_png(crop(canvas.mask).astype(np.uint8) * 255,
                              base / "ground_truth" / defect / f"{stem}_mask.png")
    info = {"frame_size": size, "margin": canvas_margin(size), "seed": seed, "generator": "data_prep.synthetic"}
    (folder / CANVAS_FOLDER / CANVAS_INFO).write_text(json.dumps(info, sort_keys=True) + "\n")


def read_canvas_info(category_dir: str | Path) -> dict | None:
    """``{"frame_size", "margin", ...}`` of a generated category, or None where no canvases were written."""
    path = Path(category_dir) / CANVAS_FOLDER / CANVAS_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        return {**info, "frame_size": int(info["frame_size"]), "margin": int(info["margin"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a canvas description ({exc})") from None


def canvas_path_for(root: str | Path, key: str, mask: bool = False) -> Path:
    """Where the canvas of the sample ``<category>/<split>/<defect>/<name>`` (or of its mask) lies."""
    category, split, defect, name = key.split("/")
    folder = Path(root) / category / CANVAS_FOLDER
    if mask:
        return folder / "ground_truth" / defect / f"{Path(name).stem}_mask.png"
    return folder / split / defect / name


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


STAGING_PREFIX = ".synthetic-staging-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def remove_stale_staging(root: Path) -> list[Path]:
    """Delete the staging folders in ``root`` that a killed run left behind; return them.

    A folder is stale when its process (named in it) is dead on this host, or when its name carries no process
    (left by a version that did not name it). Folders of live processes, of this process and of other hosts are
    kept: another run may still be writing them, and a pid means nothing on another machine.
    """
    removed = []
    for folder in sorted(root.glob(f"{STAGING_PREFIX}*")):
        if not folder.is_dir():
            continue
        named = _STAGING_NAME.match(folder.name)
        if named is not None and (named["host"] != socket.gethostname() or _process_alive(int(named["pid"]))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            print(f"removed {folder}, left by an interrupted run", file=sys.stderr)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def generate(root: str | Path, seed: int = 0, size: int = 256, categories: Sequence[str] = CATEGORIES,
             n_train: int = 200, n_test_good: int = 40, n_per_defect: int = 20, overwrite: bool = False,
             test: dict[str, int] | None = None, greyscale: bool = False) -> Path:
    """Write the synthetic dataset in MVTec AD layout under ``root`` and return ``root``.

    ``test`` gives the test images per type (``good`` and any of :func:`defect_types`), in place of
    ``n_test_good`` and ``n_per_defect``; ``greyscale`` saves single-channel images (zipper only renders so).

    All categories are first written to a hidden temporary folder inside ``root`` and renamed into place only
    when every file exists, so an interrupted run leaves no partial category behind. An existing non-empty
    ``root/<category>`` is replaced only with ``overwrite=True``. Staging folders that killed runs left in ``root``
    are removed first (:func:`remove_stale_staging`).
    """
    categories = tuple(categories)
    unknown = [c for c in categories if c not in SCENES]
    if unknown or not categories:
        raise ValueError(f"categories must be a non-empty selection of {', '.join(ALL_CATEGORIES)}; "
                         f"got {list(categories)}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories listed twice: {list(categories)}")
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_per_defect=n_per_defect)
    if test is not None:
        _check_counts(**{f"test[{name!r}]": count for name, count in test.items()})
        for category in categories:
            unknown = sorted(set(test) - {"good", *defect_types(category)})
            if unknown or "good" not in test:
                raise ValueError(f"test must hold 'good' and defect types of {category} "
                                 f"({', '.join(defect_types(category))}); got {list(test)}")
    if greyscale and set(categories) - set(MVTEC_AD_GREYSCALE):
        raise ValueError(f"greyscale images are rendered for {', '.join(MVTEC_AD_GREYSCALE)} only; "
                         f"got {list(categories)}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer of at least {MIN_SIZE} px, got {size!r}")
    root = Path(root)
    for category in categories:
        target = root / category
        if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True "
                                  f"(--overwrite) to replace it")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root)
    # Same file system as the targets, so the final rename is atomic. The name carries host and pid, so a later
    # run can tell a folder left by a killed run from one a live run is still writing.
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=root))
    try:
        for category in categories:
            _write_category(staging / category, category, int(seed), int(size), int(n_train),
                            int(n_test_good), int(n_per_defect), None if test is None else dict(test), greyscale)
        for category in categories:
            target = root / category
            if target.is_dir() or target.exists():
                # Move the old copy aside first (fast), delete it with the staging folder afterwards.
                os.replace(target, staging / f".replaced-{category}")
            os.replace(staging / category, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def summarise(root: str | Path, category: str) -> str:
    """One line describing a written category: counts per split and defect type, and mean defect area."""
    from helpers.data import list_samples, load_mask

    samples = list_samples(root, category)
    train = sum(s.split == "train" for s in samples)
    good = sum(s.split == "test" and s.label == 0 for s in samples)
    defective = [s for s in samples if s.label == 1]
    per_defect: dict[str, int] = {}
    for s in defective:
        per_defect[s.defect_type] = per_defect.get(s.defect_type, 0) + 1
    areas = [load_mask(s.mask_path).mean() for s in defective]
    mean_area = 100 * float(np.mean(areas)) if areas else 0.0
    defects = ", ".join(f"{name} {n}" for name, n in per_defect.items())
    return (f"{category}: {train} train, {good} good test, {len(defective)} defective test ({defects}); "
            f"mean defect area {mean_area:.1f}% -> {Path(root) / category}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path,
                        help="dataset folder; each category goes in root/<category>")
    parser.add_argument("--seed", type=int, default=0, help="same seed gives byte-identical files (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=ALL_CATEGORIES)
    parser.add_argument("--n-train", type=int, default=200, help="good training images per category")
    parser.add_argument("--n-test-good", type=int, default=40, help="good test images per category")
    parser.add_argument("--n-per-defect", type=int, default=20, help="test images per defect type")
    parser.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        generate(args.root, seed=args.seed, size=args.size, categories=args.categories, n_train=args.n_train,
                 n_test_good=args.n_test_good, n_per_defect=args.n_per_defect, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:  # bad arguments (DatasetError too), an existing category, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    for category in args.categories:
        print(summarise(args.root, category))
    noun = "category" if len(args.categories) == 1 else "categories"
    print(f"generated {len(args.categories)} {noun} (seed {args.seed}, {args.size} px) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one place that knows where things live: repository folders, profiles and parameterised result paths."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PROFILES = ROOT / "profiles"
DATA = ROOT / "data"
# Feature and model caches; STUDY_CACHE moves them (the smoke test keeps its own).
CACHE = Path(os.environ.get("STUDY_CACHE", ROOT / "cache"))
RUNS = ROOT / "runs"
FIGURES = ROOT / "figures"


class ProfileError(ValueError):
    """A profile file is missing or holds a bad value; the message names the file and the key."""


@dataclass(frozen=True)
class Profile:
    """The parameters one study run passes to every notebook."""

    name: str
    dataset: str  # "synthetic" (generated here) or "mvtec" (downloaded)
    data_root: str
    categories: list[str]
    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/default"
    figures_dir: str = "runs/default/figures"
    device: str = "auto"
    # Everything else a notebook may read (sweep grids, shift families, sizes), passed through untouched.
    extra: dict[str, Any] = field(default_factory=dict)

    def notebook_parameters(self) -> dict[str, Any]:
        """Flat dict handed to papermill: the fixed fields plus every extra key."""
        params = {k: v for k, v in asdict(self).items() if k not in ("extra", "name")}
        params["profile"] = self.name
        params.update(self.extra)
        return params


_FIELDS = {"dataset", "data_root", "categories", "backbone", "image_size", "seeds", "out_dir",
           "figures_dir", "device"}


def load_profile(name_or_path: str | Path) -> Profile:
    """Read ``profiles/<name>.yaml`` (or a path to a YAML file) into a :class:`Profile`."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ProfileError(f"profile file {path} does not exist (known profiles: {', '.join(known)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of parameters, got {type(raw).__name__}")
    for key in ("dataset", "data_root", "categories"):
        if key not in raw:
            raise ProfileError(f"{path}: missing required key '{key}'")
    if raw["dataset"] not in ("synthetic", "mvtec"):
        raise ProfileError(f"{path}: 'dataset' must be 'synthetic' or 'mvtec', got {raw['dataset']!r}")
    if not isinstance(raw["categories"], list) or not raw["categories"]:
        raise ProfileError(f"{path}: 'categories' must be a non-empty list")
    if "image_size" in raw and (not isinstance(raw["image_size"], int) or raw["image_size"] < 32):
        raise ProfileError(f"{path}: 'image_size' must be an integer >= 32, got {raw['image_size']!r}")
    fixed = {k: v for k, v in raw.items() if k in _FIELDS}
    extra = {k: v for k, v in raw.items() if k not in _FIELDS}
    fixed.setdefault("out_dir", f"runs/{path.stem}")
    fixed.setdefault("figures_dir", f"{fixed['out_dir']}/figures")
    return Profile(name=path.stem, extra=extra, **fixed)


def resolve(path: str | Path) -> Path:
    """Repository-relative paths in profiles and parameters resolve against the repository root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    return str(value)


def result_path(out_dir: str | Path, table: str, filename: str = "results.csv", **params: Any) -> Path:
    """``<out_dir>/results/<table>/<k1=v1>/<k2=v2>/<filename>``: the folders carry the parameters."""
    folder = resolve(out_dir) / "results" / table
    for key in sorted(params):
        folder = folder / f"{key}={_fmt(params[key])}"
    return folder / filename


def cache_key(**params: Any) -> str:
    """Stable short hash of every parameter that changes a cached artefact."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it onto ``path``: a crash never leaves a
    half-written file, and processes writing the same file at once (parallel jobs) each rename a whole one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv(df, path: Path) -> Path:
    """Atomically write a tidy table; refuse an empty one, so a broken step stops here."""
    if len(df) == 0:
        raise ValueError(f"refusing to write an empty table to {path}")
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))

"""The one place that knows where things live: repository folders, a run's folder (named by its configuration's
hash) and every path inside it, parameterised result tables, and the atomic writers everything saves through."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import pandas as pd

    from helpers.config import StudyConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PROFILES = ROOT / "profiles"
DATA = ROOT / "data"
# Feature and model caches; STUDY_CACHE moves them (the smoke test keeps its own).
CACHE = Path(os.environ.get("STUDY_CACHE", ROOT / "cache"))
RUNS = ROOT / "runs"
FIGURES = ROOT / "figures"
CONFIG_FILE = "config.yaml"


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


def result_path(folder: str | Path, table: str, filename: str = "results.csv", **params: Any) -> Path:
    """``<folder>/results/<table>/<k1=v1>/<k2=v2>/<filename>``: the folders carry the parameters."""
    out = resolve(folder) / "results" / table
    for key in sorted(params):
        out = out / f"{key}={_fmt(params[key])}"
    return out / filename


def shift_copy_path(shift_root: str | Path, mode: str, transform: str, severity: int, seed: int) -> Path:
    """Where one MVTec-Shift copy lives: ``<shift_root>/<mode>/<transform>/severity=<k>/seed=<n>``."""
    return Path(shift_root) / mode / transform / f"severity={int(severity)}" / f"seed={int(seed)}"


@dataclass(frozen=True)
class Run:
    """One configuration's run: ``<runs_dir>/<profile>-<hash>/`` holds its configuration, results, executed
    notebooks and figures, so results of another configuration can never mix into its tables."""

    profile: str
    config: "StudyConfig"
    overridden: bool = False  # overrides changed a result: not the profile's run, so never published

    @classmethod
    def open(cls, profile: str | Path = "default", overrides: Mapping | None = None, show: bool = False) -> "Run":
        """The run of a profile (plus overrides); writes its ``config.yaml`` and, with ``show``, prints it."""
        from helpers import config as config_module

        name = config_module.read_profile(profile)[0]
        config = config_module.load(profile, overrides)
        # Overrides of how a run executes (workers, engine) leave it the profile's run; any other makes a new one.
        overridden = bool(overrides) and config_module.run_hash(config) != config_module.run_hash(
            config_module.load(profile))
        run = cls(name, config, overridden)
        run.save_config()
        if show:
            print(f"# run {run.name} -> {run.dir}\n{config_module.dump(run.config)}", end="")
        return run

    @property
    def hash(self) -> str:
        from helpers.config import run_hash

        return run_hash(self.config)

    @property
    def name(self) -> str:
        return f"{self.profile}-{self.hash}"

    @property
    def dir(self) -> Path:
        return resolve(self.config.output.runs_dir) / self.name

    @property
    def figures(self) -> Path:
        return self.dir / "figures"

    @property
    def tables(self) -> Path:
        return self.figures / "tables"

    @property
    def notebooks(self) -> Path:
        return self.dir / "notebooks"

    @property
    def state(self) -> Path:
        return self.dir / ".state"

    @property
    def publish_dir(self) -> Path | None:
        """Where the profile's figures are published (``output.figures_dir``); None for an overridden run."""
        folder = self.config.output.figures_dir
        return None if folder is None or self.overridden else resolve(folder)

    def save_config(self) -> Path:
        from helpers.config import dump

        path = self.dir / CONFIG_FILE
        text = dump(self.config)
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, lambda tmp: tmp.write_text(text))
        return path

    def table(self, name: str, filename: str = "results.csv", **params: Any) -> Path:
        return result_path(self.dir, name, filename, **params)

    # --- data -----------------------------------------------------------------------------------------------

    def data_root(self, draw: int) -> Path:
        """The clean dataset of a data draw: generated data has one folder per generator seed."""
        root = resolve(self.config.data.root)
        return root / f"seed={int(draw)}" if self.config.data.dataset == "synthetic" else root

    def manifest_path(self, draw: int) -> Path:
        return self.table("splits", "manifest.csv", draw=draw)

    def manifest(self, draw: int) -> "pd.DataFrame":
        from helpers import splits

        return splits.load(self.manifest_path(draw))

    def shift_root(self, draw: int) -> Path:
        """Shifted copies of one draw's dataset, beside those of the other draws."""
        base = resolve(self.config.shift.root) / self.config.data.dataset
        return base / f"seed={int(draw)}" if self.config.data.dataset == "synthetic" else base

    def shift_copy(self, draw: int, mode: str, transform: str, severity: int) -> Path:
        return shift_copy_path(self.shift_root(draw), mode, transform, severity, self.config.shift.seed)

    def control_root(self, draw: int, patch: float) -> Path:
        """The unified study's positive control (cross-category anomalies with squares of side ``patch``) made
        from one draw's data: ``<control root>/<dataset>[/seed=<draw>]/patch=<share>/per_pair=<n>``, the control
        root being ``unified.control_root`` or, by default, ``cross_category`` beside the data's root."""
        unified = self.config.unified
        root = unified.control_root or resolve(self.config.data.root).parent / "cross_category"
        base = resolve(root) / self.config.data.dataset
        if self.config.data.dataset == "synthetic":
            base = base / f"seed={int(draw)}"
        return base / f"patch={_fmt(float(patch))}" / f"per_pair={int(unified.control_per_pair)}"


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


def write_csv(df: "pd.DataFrame", path: Path) -> Path:
    """Atomically write a tidy table; refuse an empty one, so a broken step stops here."""
    if len(df) == 0:
        raise ValueError(f"refusing to write an empty table to {path}")
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))

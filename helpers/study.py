"""The study runner: execute the notebook pipeline in order with papermill for one configuration (a profile plus
optional overrides), into that configuration's run folder.

``python -m helpers.study --profile NAME [--set key=value ...] [--only 00 02] [--force] [--workers N]
[--engine local|dask] [--scheduler tcp://HOST:8786]``

Executed copies land in ``<run>/notebooks/``; the method notebook runs once per configured method
(``02_patchcore``, ``03_padim``). A step is skipped when its fingerprint (its notebook's text, its parameters,
the resolved configuration, the code of ``helpers``/``data_prep`` and the fingerprint of the step before it)
matches the one recorded after its last successful run, so a re-run only redoes what changed downstream.
After a run, the run's figures are published to the profile's ``output.figures_dir`` and the seconds each
step took are written to one small file, ``run_times.md``, beside them.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helpers.config import UNHASHED, ProfileError, StudyConfig, to_dict
from helpers.paths import NOTEBOOKS, ROOT, Run, atomic_write

RUN_TIMES = "run_times.md"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the cell."""


@dataclass(frozen=True)
class Step:
    name: str  # the executed copy's stem, e.g. "02_patchcore"
    source: str  # notebook file under notebooks/
    parameters: dict = field(default_factory=dict)  # besides profile and overrides


METHOD_NOTEBOOK = "02_method.ipynb"


def pipeline(config: StudyConfig) -> list[Step]:
    """The steps of a study, in order: data, shift, one method notebook per method, thresholds, unified, report."""
    steps = [Step("00_data", "00_data.ipynb"), Step("01_shift", "01_shift.ipynb")]
    steps += [Step(f"{2 + i:02d}_{m}", METHOD_NOTEBOOK, {"method": m}) for i, m in enumerate(config.methods)]
    steps += [Step("04_threshold_adaptation", "04_threshold_adaptation.ipynb"), Step("05_unified", "05_unified.ipynb"),
              Step("06_report", "06_report.ipynb")]
    return steps


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks NN_*.ipynb in {folder}")
    return found


def code_digest() -> str:
    """Hash of the package sources: a change to the logic re-runs the notebooks that use it."""
    h = hashlib.sha256()
    for pkg in ("helpers", "data_prep"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def fingerprint(notebook: Path, parameters: dict, config_text: str, upstream: str, code: str) -> str:
    h = hashlib.sha256()
    for part in (notebook.read_bytes(), json.dumps(parameters, sort_keys=True, default=str).encode(),
                 config_text.encode(), upstream.encode(), code.encode()):
        h.update(part)
    return h.hexdigest()


def run(profile: str | Path = "default", overrides: dict | None = None, only: list[str] | None = None,
        force: bool = False, log=print, folder: Path | None = None) -> list[Path]:
    """Run every step for the configuration; returns the executed copies. Stops at the first failure."""
    import papermill as pm

    folder = folder or NOTEBOOKS
    study = Run.open(profile, overrides)
    study.notebooks.mkdir(parents=True, exist_ok=True)
    study.state.mkdir(parents=True, exist_ok=True)
    # How a run executes (workers, engine) never changes a result: it stays out of every fingerprint, so
    # re-running with other execution flags skips the finished steps.
    config_text = json.dumps({k: v for k, v in to_dict(study.config).items() if k not in UNHASHED}, sort_keys=True)
    code = code_digest()
    upstream, executed = "", []
    log(f"[study] run {study.name} in {study.dir}")
    for step in pipeline(study.config):
        source = folder / step.source
        if not source.is_file():
            raise FileNotFoundError(f"notebook {source} of step {step.name} does not exist")
        parameters = {"profile": str(profile), "overrides": dict(overrides or {}), **step.parameters}
        fp = fingerprint(source, _result_parameters(parameters), config_text, upstream, code)
        upstream = fp
        out, state = study.notebooks / f"{step.name}.ipynb", study.state / f"{step.name}.json"
        if only is not None and not any(step.name.startswith(o) for o in only):
            continue
        if not force and out.is_file() and state.is_file() and json.loads(state.read_text()).get("fingerprint") == fp:
            log(f"[study] {step.name}: unchanged, skipped")
            executed.append(out)
            continue
        log(f"[study] {step.name}: running")
        start = time.perf_counter()
        state.unlink(missing_ok=True)  # a failed run must not look finished next time
        try:
            pm.execute_notebook(str(source), str(out), parameters=parameters, cwd=str(ROOT), kernel_name="python3",
                                progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as exc:
            raise NotebookFailed(f"{step.name} failed in {_failed_cell(out)} ({exc.ename}: {exc.evalue}); "
                                 f"the executed copy with the traceback is {out}") from None
        seconds = time.perf_counter() - start
        atomic_write(state, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fp, "seconds": round(seconds, 1)})))
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        log(f"[study] {step.name}: done in {seconds:.0f} s -> {shown}")
        executed.append(out)
    if only is None:
        write_run_times(study)
        render_pages(study, log)
        publish(study, log)
    return executed


def _result_parameters(parameters: dict) -> dict:
    """The parameters that can change what a step computes: overrides of the unhashed sections left out."""
    kept = {k: v for k, v in parameters["overrides"].items() if k.split(".")[0] not in UNHASHED}
    return {**parameters, "overrides": kept}


def _failed_cell(executed: Path) -> str:
    """'cell N: <first line>' numbered as in the source notebook (papermill's injected cell not counted)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    added = {"injected-parameters", "papermill-error-cell-tag"}  # cells papermill adds to the copy
    cells = [c for c in nb.cells if not added & set(c.metadata.get("tags", []))]
    for number, cell in enumerate(cells, start=1):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = next((line for line in cell.source.splitlines() if line.strip()), "")
            return f"cell {number}: `{first[:60]}`"
    return "an unknown cell"


def timings(study: Run) -> dict[str, float]:
    """Seconds each step took in its last successful run."""
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(study.state.glob("*.json"))}


def write_run_times(study: Run) -> Path:
    """The one file that changes from run to run: seconds per step (and the efficiency measurements the
    report notebook writes to ``<run>/efficiency_times.md``)."""
    times = timings(study)
    lines = ["# Run times", "", f"Run `{study.name}`; seconds per notebook, as last executed.", "",
             "| notebook | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in times.items()],
             f"| total | {sum(times.values()):.0f} |", ""]
    extra = study.dir / "efficiency_times.md"
    if extra.is_file():
        lines += [extra.read_text()]
    path = study.figures / RUN_TIMES
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
    return path


def render_pages(study: Run, log=print) -> list[Path]:
    """The executed notebooks as HTML pages beside the figures they link to, checked (in a headless browser where
    one is installed); a page with a broken figure stops the run before anything is published."""
    from helpers import render_notebooks

    pages = render_notebooks.render_run(study)
    problems = render_notebooks.check_pages(study.figures / render_notebooks.PAGES, log=log)
    if problems:
        raise NotebookFailed("rendered notebooks have problems: " + "; ".join(problems[:5]))
    return pages


def publish(study: Run, log=print) -> Path | None:
    """Mirror the run's figures folder into the profile's ``output.figures_dir``: changed files are replaced,
    identical ones left untouched (no churn in git), files the run no longer makes are removed."""
    target = study.publish_dir
    if target is None or not study.figures.is_dir():
        return None
    source_files = {p.relative_to(study.figures) for p in study.figures.rglob("*") if p.is_file()}
    for rel in sorted(source_files):
        src, dst = study.figures / rel, target / rel
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    for path in sorted(target.rglob("*"), reverse=True):
        if path.is_file() and path.relative_to(target) not in source_files:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    log(f"[study] figures of {study.name} published to {target}")
    return target


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ProfileError(f"--set expects key=value (e.g. methods.patchcore.k=3), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def execution_overrides(workers: int | None = None, engine: str | None = None, scheduler: str | None = None) -> dict:
    """The command line's execution flags as overrides: they say how jobs run, so the run (its hash, its folder)
    stays the profile's."""
    if scheduler and engine == "local":
        raise ProfileError("--scheduler names a Dask scheduler; it needs --engine dask, not --engine local")
    engine = "dask" if scheduler else engine
    if engine == "dask":
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise ProfileError("--engine dask needs the 'distributed' package: pip install -r requirements.txt")
    given = {"execution.workers": workers, "execution.engine": engine, "execution.scheduler": scheduler}
    return {key: value for key, value in given.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="profiles/<name>.yaml or a path to a YAML profile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one configuration value, e.g. --set methods.patchcore.k=3 (repeatable)")
    parser.add_argument("--only", nargs="*", help="step prefixes to run, e.g. 00 02")
    parser.add_argument("--force", action="store_true", help="re-run even unchanged steps")
    parser.add_argument("--workers", type=int, help="parallel jobs (0: one per core); does not change results")
    parser.add_argument("--engine", choices=["local", "dask"],
                        help="run jobs in local processes or on Dask (a LocalCluster unless --scheduler); "
                             "does not change results")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler to run jobs on, e.g. tcp://HOST:8786 (implies --engine dask)")
    args = parser.parse_args(argv)
    try:
        overrides = {**_parse_set(args.set), **execution_overrides(args.workers, args.engine, args.scheduler)}
        start = time.perf_counter()
        run(args.profile, overrides or None, args.only, args.force)
        print(f"[study] profile {args.profile} finished in {time.perf_counter() - start:.0f} s")
    except (ProfileError, NotebookFailed, FileNotFoundError) as exc:
        print(f"[study] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

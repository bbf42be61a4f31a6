"""The study runner: execute the notebook pipeline in order with papermill for one configuration (a profile plus
optional overrides), into that configuration's run folder.

``python -m helpers.study --profile NAME [--set key=value ...] [--only 00 02] [--force] [--workers N]
[--engine local|dask] [--scheduler tcp://HOST:8786] [--plan]``

Executed copies land in ``<run>/notebooks/``; the method notebook runs once per configured method
(``02_patchcore``, ``03_padim``). A step is skipped when its fingerprint (its notebook's text, its parameters,
the resolved configuration, the code of ``helpers``/``data_prep`` and the fingerprint of the step before it)
matches the one recorded after its last successful run, so a re-run only redoes what changed downstream.
After a run, the run's figures are published to the profile's ``output.figures_dir`` and what each step took
(seconds, peak memory of the kernel and its workers, peak GPU memory, disk use of the data, shifted copies, caches
and run afterwards) is written to one small file, ``run_times.md``, beside them, with the per-batch job timings
(``job_times.json``) that ``--plan`` reads to estimate what a profile will take before it runs.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helpers.config import UNHASHED, ProfileError, StudyConfig, to_dict
from helpers.paths import CACHE, NOTEBOOKS, ROOT, Run, atomic_write, resolve

RUN_TIMES = "run_times.md"
JOB_TIMES = "job_times.json"  # every step's seconds, resources and per-batch timings, for helpers.plan


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


# --- what a step costs ---------------------------------------------------------------------------------------


def process_tree_rss(root) -> int:
    """Resident bytes of a process and every descendant (a notebook kernel and its worker processes); shared pages
    are counted once per process that maps them, as ``ps`` does."""
    import psutil

    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # ended between listing and reading
    return total


def gpu_memory_used() -> int | None:
    """Bytes of GPU memory in use on every GPU this machine's ``nvidia-smi`` lists; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(float(v)) for v in out.split()) * 2 ** 20
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class StepMonitor:
    """Context manager sampling, from a thread, the resident memory of this process tree (every ``interval_s``)
    and the GPU memory in use (every ``gpu_interval_s``); their peaks are ``peak_rss`` and ``peak_gpu`` (the GPU
    memory the step added to what was in use at its start; None without a GPU)."""

    def __init__(self, interval_s: float = 0.25, gpu_interval_s: float = 2.0) -> None:
        import psutil

        self.interval_s, self.gpu_interval_s = interval_s, gpu_interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.peak_rss = 0
        self.peak_gpu: int | None = None

    def _sample(self) -> None:
        last_gpu = 0.0
        while True:
            self.peak_rss = max(self.peak_rss, process_tree_rss(self._process))
            if self._gpu_start is not None and time.monotonic() - last_gpu >= self.gpu_interval_s:
                used = gpu_memory_used()
                if used is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, used - self._gpu_start)
                last_gpu = time.monotonic()
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "StepMonitor":
        self._gpu_start = gpu_memory_used()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="step-monitor")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def disk_use(path: Path) -> int:
    """Bytes a folder takes on disk, as ``du`` counts them (allocated blocks, each hard-linked file once, symbolic
    links not followed); 0 when it does not exist."""
    total, seen, stack = 0, set(), [Path(path)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def study_folders(study: Run) -> dict[str, Path]:
    """The folders whose disk use the runner records: the data (every draw), its shifted copies, the caches (shared
    by every profile) and the run."""
    cfg = study.config
    cache = Path(os.environ["STUDY_CACHE"]) if os.environ.get("STUDY_CACHE") else CACHE
    return {"data": resolve(cfg.data.root), "shift": resolve(cfg.shift.root) / cfg.data.dataset, "cache": cache,
            "run": study.dir}


def _execute(source: Path, out: Path, parameters: dict, step: str, jobs_file: Path):
    """Execute one notebook with papermill, its batches' timings going to ``jobs_file``; returns the monitor."""
    import papermill as pm

    from helpers import parallel

    saved = {k: os.environ.get(k) for k in (parallel.JOB_TIMES_ENV, parallel.STEP_ENV)}
    # The kernel inherits this process's environment: its run_jobs calls append to the step's file.
    os.environ[parallel.JOB_TIMES_ENV], os.environ[parallel.STEP_ENV] = str(jobs_file), step
    try:
        with StepMonitor() as monitor:
            pm.execute_notebook(str(source), str(out), parameters=parameters, cwd=str(ROOT), kernel_name="python3",
                                progress_bar=False, log_output=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return monitor


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
        jobs_file = study.state / f"{step.name}.jobs.jsonl"
        jobs_file.unlink(missing_ok=True)  # the timings of this execution only
        try:
            monitor = _execute(source, out, parameters, step.name, jobs_file)
        except pm.PapermillExecutionError as exc:
            raise NotebookFailed(f"{step.name} failed in {_failed_cell(out)} ({exc.ename}: {exc.evalue}); "
                                 f"the executed copy with the traceback is {out}") from None
        seconds = time.perf_counter() - start
        record = {"fingerprint": fp, "seconds": round(seconds, 1), "peak_rss_bytes": monitor.peak_rss,
                  "peak_gpu_bytes": monitor.peak_gpu,
                  "disk_bytes": {name: disk_use(path) for name, path in study_folders(study).items()}}
        atomic_write(state, lambda tmp, text=json.dumps(record): tmp.write_text(text))
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        log(f"[study] {step.name}: done in {seconds:.0f} s, peak {monitor.peak_rss / 2 ** 30:.1f} GiB -> {shown}")
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


def step_records(study: Run) -> dict[str, dict]:
    """What each step's last successful run recorded: seconds, peak memory, disk use (older runs: seconds only)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(study.state.glob("*.json"))}


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f}"


def write_run_times(study: Run) -> Path:
    """The one file that changes from run to run: per step its seconds, the peak resident memory of the kernel
    and its workers, the peak GPU memory and the disk use after it (and the efficiency measurements the report
    notebook writes to ``<run>/efficiency_times.md``); beside it ``job_times.json`` for ``--plan``."""
    records = step_records(study)
    folders = ["data", "shift", "cache", "run"]
    gpu = any(r.get("peak_gpu_bytes") is not None for r in records.values())
    lines = ["# Run times", "", f"Run `{study.name}`; per notebook, as last executed on {_machine()}: seconds, peak "
             "resident memory of the kernel and its worker processes (summed over processes), peak GPU memory "
             + ("the step added (nvidia-smi)" if gpu else "(no GPU seen by nvidia-smi)")
             + ", and disk use in GiB after the step of the data (every draw), its shifted copies, the caches "
             "(shared by every profile) and the run folder.", "",
             "| notebook | seconds | peak RAM GiB | peak GPU GiB | " + " | ".join(folders) + " |",
             "|---|---|---|---|" + "---|" * len(folders)]
    for step, r in records.items():
        disk = r.get("disk_bytes", {})
        lines.append(f"| {step} | {r['seconds']:.0f} | {_gib(r.get('peak_rss_bytes'))} | "
                     f"{_gib(r.get('peak_gpu_bytes'))} | " + " | ".join(_gib(disk.get(f)) for f in folders) + " |")
    lines += [f"| total | {sum(r['seconds'] for r in records.values()):.0f} | "
              f"{_gib(max((r.get('peak_rss_bytes') or 0 for r in records.values()), default=0))} | | | | | |", ""]
    extra = study.dir / "efficiency_times.md"
    if extra.is_file():
        lines += [extra.read_text()]
    path = study.figures / RUN_TIMES
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
    write_job_times(study)
    return path


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores"


def step_summaries(state: Path) -> dict[str, dict]:
    """Per step recorded in a run's ``.state`` folder: its seconds, the timing line of every batch of jobs
    (``helpers.parallel.record_batch``; None when the step recorded none) and its resources."""
    steps = {}
    for path in sorted(state.glob("*.json")):
        record = json.loads(path.read_text())
        jobs = state / f"{path.stem}.jobs.jsonl"
        lines = [json.loads(line) for line in jobs.read_text().splitlines() if line.strip()] if jobs.is_file() else None
        steps[path.stem] = {"seconds": record["seconds"], "batches": lines,
                            "resources": {k: v for k, v in record.items() if k not in ("fingerprint", "seconds")}}
    return steps


def write_job_times(study: Run) -> Path:
    """``job_times.json`` beside ``run_times.md``: the run's configuration and its :func:`step_summaries`, which
    ``helpers.plan`` reads."""
    body = {"run": study.name, "profile": study.profile, "machine": _machine(), "config": to_dict(study.config),
            "steps": step_summaries(study.state)}
    path = study.figures / JOB_TIMES
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n"))
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


def parse_set(items: list[str]) -> dict:
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
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: print the jobs the profile implies and their estimated time here and, "
                             "with --workers N, on N workers")
    parser.add_argument("--timings", metavar="PATH",
                        help="with --plan: the run folder or job_times.json whose recorded times to scale (default: "
                             "a run of this profile, else of default)")
    args = parser.parse_args(argv)
    if args.timings and not args.plan:
        parser.error("--timings goes with --plan")
    if args.plan:
        from helpers import plan

        try:
            print(plan.report(args.profile, parse_set(args.set) or None, workers=args.workers,
                              timings=args.timings), end="")
        except (ProfileError, FileNotFoundError) as exc:
            print(f"[study] error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        overrides = {**parse_set(args.set), **execution_overrides(args.workers, args.engine, args.scheduler)}
        start = time.perf_counter()
        run(args.profile, overrides or None, args.only, args.force)
        print(f"[study] profile {args.profile} finished in {time.perf_counter() - start:.0f} s")
    except (ProfileError, NotebookFailed, FileNotFoundError) as exc:
        print(f"[study] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The study runner: execute ``notebooks/NN_*.ipynb`` in order with papermill, passing a profile's parameters.

Executed copies land in ``<out_dir>/notebooks/``. A notebook is skipped when its fingerprint (its own text,
the parameters, the code of ``helpers``/``data_prep`` and the fingerprint of the notebook before it) matches
the one recorded after its last successful run, so a re-run only redoes what changed downstream.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from helpers.paths import NOTEBOOKS, ROOT, ProfileError, load_profile, resolve


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the cell."""


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


def fingerprint(notebook: Path, parameters: dict, upstream: str, code: str) -> str:
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    h.update(upstream.encode())
    h.update(code.encode())
    return h.hexdigest()


def run(profile_name: str, only: list[str] | None = None, force: bool = False, log=print) -> list[Path]:
    """Run every notebook for the profile; returns the executed copies. Stops at the first failure."""
    import papermill as pm

    profile = load_profile(profile_name)
    params = profile.notebook_parameters()
    out_dir = resolve(profile.out_dir) / "notebooks"
    state_dir = resolve(profile.out_dir) / ".state"
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    code = code_digest()
    upstream = ""
    executed = []
    for nb in notebooks():
        fp = fingerprint(nb, params, upstream, code)
        upstream = fp
        out = out_dir / nb.name
        state = state_dir / f"{nb.stem}.json"
        wanted = only is None or any(nb.name.startswith(o) or nb.stem == o for o in only)
        if not wanted:
            continue
        if not force and out.is_file() and state.is_file() and json.loads(state.read_text()).get("fingerprint") == fp:
            log(f"[study] {nb.name}: unchanged, skipped")
            executed.append(out)
            continue
        log(f"[study] {nb.name}: running (profile {profile.name})")
        start = time.perf_counter()
        state.unlink(missing_ok=True)  # a failed run must not look finished next time
        # Only the parameters a notebook declares are passed: its executed copy then lists exactly its inputs.
        declared = pm.inspect_notebook(str(nb))
        try:
            pm.execute_notebook(str(nb), str(out), parameters={k: v for k, v in params.items() if k in declared},
                                cwd=str(ROOT), kernel_name="python3",
                                progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as exc:
            raise NotebookFailed(f"{nb.name} failed in {_failed_cell(out)} ({exc.ename}: {exc.evalue}); "
                                 f"the executed copy with the traceback is {out}") from None
        seconds = time.perf_counter() - start
        state.write_text(json.dumps({"fingerprint": fp, "seconds": round(seconds, 1),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        log(f"[study] {nb.name}: done in {seconds:.0f} s -> {shown}")
        executed.append(out)
    return executed


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


def timings(out_dir: str | Path) -> dict[str, float]:
    """Seconds each notebook took in its last successful run under ``out_dir`` (for the report)."""
    state_dir = resolve(out_dir) / ".state"
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(state_dir.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default", help="profiles/<name>.yaml")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 00 02")
    parser.add_argument("--force", action="store_true", help="re-run even unchanged notebooks")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        run(args.profile, args.only, args.force)
        print(f"[study] profile {args.profile} finished in {time.perf_counter() - start:.0f} s")
    except (ProfileError, NotebookFailed, FileNotFoundError) as exc:
        print(f"[study] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

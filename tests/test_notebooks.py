"""The notebooks as a pipeline: committed clean, and all of them run through the runner on the smoke profile."""
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers import study
from helpers.paths import NOTEBOOKS, PROFILES

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_every_expected_notebook_exists():
    stems = [p.stem for p in NOTEBOOK_FILES]
    for prefix in ["00_data", "01_shift", "02_method", "04_threshold", "05_unified", "06_report"]:
        assert any(s.startswith(prefix) for s in stems), prefix


def test_the_method_notebook_runs_once_per_method_as_02_and_03():
    from helpers.config import load

    steps = study.pipeline(load("default"))
    assert [s.name for s in steps][:4] == ["00_data", "01_shift", "02_patchcore", "03_padim"]
    assert {s.source for s in steps if s.parameters.get("method")} == {study.METHOD_NOTEBOOK}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "notebook has outputs"
    assert nb.cells[0].cell_type == "markdown", "first cell must say what the notebook answers"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and code[0] is tagged[0], "first code cell must be the one tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_papermill_sees_every_parameter_the_cell_assigns(path):
    """papermill skips a line it cannot parse (it did for a comment holding ';') and the runner then never
    passes that parameter: the notebook silently keeps its own default."""
    import ast

    import papermill as pm

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = [node.target.id if isinstance(node, ast.AnnAssign) else node.targets[0].id
                for node in ast.parse(cell.source).body if isinstance(node, (ast.AnnAssign, ast.Assign))]
    assert assigned, "the parameters cell assigns nothing"
    assert set(assigned) <= set(pm.inspect_notebook(str(path))), "papermill misses some parameters"


# What a parameters cell may hold: which configuration to run, and which method (the method notebook).
ALLOWED_PARAMETERS = {"profile", "overrides", "method"}


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.name)
def test_parameters_cells_hold_no_configuration_defaults(path):
    """Defaults live in helpers/config.py only: a notebook opened in JupyterLab runs what make study runs."""
    import ast

    from helpers import config

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = {node.target.id if isinstance(node, ast.AnnAssign) else node.targets[0].id
                for node in ast.parse(cell.source).body if isinstance(node, (ast.AnnAssign, ast.Assign))}
    section_keys = {f for section in config.to_dict(config.load("default")).values() if isinstance(section, dict)
                    for f in section}
    extra = assigned - ALLOWED_PARAMETERS
    assert not extra, f"configuration values in the parameters cell: {extra}"
    assert not assigned & section_keys
    assert "profile" in assigned and "overrides" in assigned


def _smoke_profile(tmp_path: Path, **patch) -> Path:
    from helpers.config import deep_merge

    raw = yaml.safe_load((PROFILES / "smoke.yaml").read_text())
    raw = deep_merge(raw, {"data.root": str(tmp_path / "data" / "synthetic"),
                           "shift.root": str(tmp_path / "data" / "shift"),
                           "output": {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "published")},
                           **patch})
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_runner_executes_every_notebook_on_the_smoke_profile(tmp_path, monkeypatch):
    import filecmp

    from helpers.paths import Run

    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    profile = _smoke_profile(tmp_path)
    executed = study.run(str(profile), log=lambda *_: None)
    run = Run.open(profile)
    assert [p.stem for p in executed] == [s.name for s in study.pipeline(run.config)]
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}"
        first = next(c for c in nb.cells
                     if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
                     and "parameters" not in c.metadata.get("tags", []))
        shown = "".join(o.get("text", "") for o in first.outputs)
        assert f"# run {run.name}" in shown, f"{path.name} does not show its resolved configuration first"
    figures = run.figures
    captions = json.loads((figures / "captions.json").read_text())
    for name in captions:
        assert (figures / f"{name}.png").stat().st_size > 0 and (figures / f"{name}.pdf").stat().st_size > 0
    report_text = (figures / "REPORT.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_text)
    assert linked, "REPORT.md shows no figure"
    for name in linked:  # every figure the report shows exists and is not empty
        assert (figures / name).stat().st_size > 0, name
    for name in ("baseline", "shift_drop", "sweep", "threshold_recovery_pooled", "unified_intervals"):
        for suffix in (".csv", ".md", ".tex"):
            assert (figures / "tables" / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"
    assert "\\toprule" in (figures / "tables" / "baseline.tex").read_text(), "LaTeX tables use booktabs"
    assert not re.search(r"\bnan\b", report_text, re.I), "the report quotes a missing number"
    from helpers import report as report_module

    assert report_module.untraceable_numbers(report_text, figures / "tables") == []
    # The run is published: the profile's figures folder mirrors the run's, run times included.
    published = tmp_path / "published"
    assert (published / "REPORT.md").read_text() == report_text and (published / study.RUN_TIMES).is_file()
    assert not filecmp.dircmp(figures, published).diff_files

    # A second run with nothing changed skips every notebook and rewrites no figure.
    before = {p: p.stat().st_mtime_ns for p in published.rglob("*") if p.is_file() and p.name != study.RUN_TIMES}
    logs = []
    study.run(str(profile), log=logs.append)
    skipped = [line for line in logs if "skipped" in line]
    assert len(skipped) == len(executed), logs
    assert before == {p: p.stat().st_mtime_ns for p in published.rglob("*")
                      if p.is_file() and p.name != study.RUN_TIMES}

    # Re-fitting from scratch with the same seeds reproduces the results (timing columns aside).
    import shutil

    import pandas as pd

    tables = sorted((run.dir / "results" / "shift_drop").rglob("*.csv"))
    before_tables = [pd.read_csv(t) for t in tables]
    shutil.rmtree(tmp_path / "cache" / "models")
    study.run(str(profile), only=["02", "03"], force=True, log=lambda *_: None)
    for table, old in zip(tables, before_tables):
        new = pd.read_csv(table)
        keep = [c for c in old.columns if not c.endswith("_s")]
        pd.testing.assert_frame_equal(old[keep], new[keep])


def test_results_of_another_configuration_never_enter_a_runs_tables(tmp_path):
    import pandas as pd

    from helpers import report
    from helpers.paths import Run, write_csv

    profile = _smoke_profile(tmp_path)
    first, second = Run.open(profile), Run.open(profile, {"model.image_size": 96})
    assert first.dir.parent == second.dir.parent and first.dir != second.dir
    for run, auroc in ((first, 0.9), (second, 0.1)):
        write_csv(pd.DataFrame({"method": ["patchcore"], "image_auroc": [auroc]}),
                  run.table("shift_drop", method="patchcore"))
    assert report.load_results(first, "shift_drop")["image_auroc"].tolist() == [0.9]
    assert report.load_results(second, "shift_drop")["image_auroc"].tolist() == [0.1]


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# broken"),
                                         nbformat.v4.new_code_cell("profile = 'x'\noverrides = {}",
                                                                   metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "00_data.ipynb")
    profile = _smoke_profile(tmp_path)
    failure = r"00_data failed in cell 3: `raise ValueError\('boom'\)` \(ValueError: boom\)"
    with pytest.raises(study.NotebookFailed, match=failure):
        study.run(str(profile), log=lambda *_: None, folder=folder)
    assert not list(tmp_path.glob("runs/*/.state/*.json")), "a failed notebook must not be marked done"


def test_a_dataset_without_pixel_masks_runs_every_notebook(tmp_path, monkeypatch):
    """Image-level labels only (no ground_truth folder): every notebook runs, and pixel metrics are reported as
    not available instead of being invented."""
    import pandas as pd

    from helpers.paths import Run

    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    profile = _smoke_profile(tmp_path, **{"data.synthetic.ground_truth": False, "data.draws": [0],
                                          "model.seeds": [0]})
    executed = study.run(str(profile), log=lambda *_: None)
    run = Run.open(profile)
    assert not list(run.data_root(0).glob("*/ground_truth"))
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    baseline = pd.read_csv(run.tables / "baseline.csv")
    assert baseline["pixel_aupro"].isna().all() and baseline["image_auroc"].notna().all()
    assert "n/a" in (run.figures / "REPORT.md").read_text()

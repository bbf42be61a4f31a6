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
    for prefix in ["00_data", "01_shift", "02_patchcore", "03_padim", "04_threshold", "05_unified", "06_report"]:
        assert any(s.startswith(prefix) for s in stems), prefix


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


def test_every_profile_key_is_a_parameter_of_some_notebook():
    declared = {name for path in NOTEBOOK_FILES for name in __import__("papermill").inspect_notebook(str(path))}
    for profile in PROFILES.glob("*.yaml"):
        unused = set(yaml.safe_load(profile.read_text())) - declared
        assert not unused, f"{profile.name}: {sorted(unused)} reach no notebook"


def _smoke_profile(tmp_path: Path) -> Path:
    raw = yaml.safe_load((PROFILES / "smoke.yaml").read_text())
    raw["data_root"] = str(tmp_path / "data" / "synthetic")
    raw["shift_root"] = str(tmp_path / "data" / "shift")
    raw["out_dir"] = str(tmp_path / "run")
    raw["figures_dir"] = str(tmp_path / "run" / "figures")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_runner_executes_every_notebook_on_the_smoke_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    profile = _smoke_profile(tmp_path)
    executed = study.run(str(profile), log=lambda *_: None)
    assert [p.name for p in executed] == [p.name for p in NOTEBOOK_FILES]
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}"
    figures = tmp_path / "run" / "figures"
    captions = json.loads((figures / "captions.json").read_text())
    for name in captions:
        assert (figures / f"{name}.png").stat().st_size > 0 and (figures / f"{name}.pdf").stat().st_size > 0
    report_text = (figures / "REPORT.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_text)
    assert linked, "REPORT.md shows no figure"
    for name in linked:  # every figure the report shows exists and is not empty
        assert (figures / name).stat().st_size > 0, name
    for name in ("baseline", "shift_drop", "sweep", "threshold_regimes", "unified", "efficiency"):
        for suffix in (".csv", ".md", ".tex"):
            assert (figures / "tables" / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"
    assert "\\toprule" in (figures / "tables" / "baseline.tex").read_text(), "LaTeX tables use booktabs"
    for section in ("## Setup", "## Clean baseline", "## Drop under shift", "## Threshold regimes", "## Unified model",
                    "## Efficiency"):
        assert section in report_text, section
    assert "nan" not in report_text.lower().replace("nanoseconds", ""), "the report quotes a missing number"

    # A second run with nothing changed skips every notebook.
    logs = []
    study.run(str(profile), log=logs.append)
    assert logs and all("skipped" in line for line in logs)

    # Re-fitting from scratch with the same seeds reproduces the results (timing columns aside).
    import pandas as pd
    import shutil

    tables = sorted((tmp_path / "run" / "results" / "shift_drop").rglob("*.csv"))
    before = [pd.read_csv(t) for t in tables]
    shutil.rmtree(tmp_path / "cache" / "models")
    study.run(str(profile), only=["02", "03"], force=True, log=lambda *_: None)
    for table, old in zip(tables, before):
        new = pd.read_csv(table)
        keep = [c for c in old.columns if not c.endswith("_s")]
        pd.testing.assert_frame_equal(old[keep], new[keep])


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# broken"),
                                         nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "00_broken.ipynb")
    monkeypatch.setattr(study, "NOTEBOOKS", folder)
    monkeypatch.setattr(study, "notebooks", lambda folder=folder: sorted(folder.glob("[0-9][0-9]_*.ipynb")))
    profile = _smoke_profile(tmp_path)
    with pytest.raises(study.NotebookFailed, match=r"00_broken.ipynb failed in cell 3: `raise ValueError\('boom'\)` \(ValueError: boom\)"):
        study.run(str(profile), log=lambda *_: None)
    assert not list((tmp_path / "run" / ".state").glob("*.json")), "a failed notebook must not be marked done"

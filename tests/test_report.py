"""The report states only numbers its committed tables hold, and its LaTeX tables are well formed."""
import re
import shutil
import subprocess

import pandas as pd
import pytest

from helpers import report
from helpers.paths import FIGURES


def test_a_number_no_table_holds_is_found(tmp_path):
    pd.DataFrame({"method": ["patchcore"], "image_auroc": [0.92641], "fpr": [0.35]}).to_csv(tmp_path / "t.csv",
                                                                                           index=False)
    text = ("# 3.1 A heading 1.5\nAUROC 0.926 and 35 % of normals; `blocks.2` and torch 2.14.1 are names.\n"
            "![fig 0.5](x.png)\n")
    assert report.untraceable_numbers(text, tmp_path) == []
    assert report.untraceable_numbers(text + "A made-up 0.812 and 41 %.\n", tmp_path) == ["0.812", "41 %"]


@pytest.mark.skipif(not (FIGURES / "REPORT.md").is_file(), reason="no committed report")
def test_every_number_of_the_committed_report_is_in_a_committed_table():
    text = (FIGURES / "REPORT.md").read_text()
    assert report.untraceable_numbers(text, FIGURES / "tables") == []


@pytest.mark.skipif(not (FIGURES / "REPORT.md").is_file(), reason="no committed report")
def test_the_committed_report_has_the_papers_four_sections_and_every_figure_it_shows():
    text = (FIGURES / "REPORT.md").read_text()
    for heading in ("## 1 Methodology", "## 2 Experimental setup", "## 3 Results and discussion", "## 4 Conclusion"):
        assert heading in text, heading
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (FIGURES / name).is_file(), name


def latex_problems(tex: str) -> list[str]:
    """What would stop a table from compiling: unbalanced braces or environments, a missing booktabs rule, or a
    bare special character in a cell."""
    problems = []
    depth = 0
    for ch in re.sub(r"\\[{}%&_#$]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            problems.append("a } closes nothing")
            break
    if depth > 0:
        problems.append("an unclosed {")
    if re.findall(r"\\begin\{(\w+)\}", tex) != list(reversed(re.findall(r"\\end\{(\w+)\}", tex))):
        problems.append("environments do not nest")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        if rule not in tex:
            problems.append(f"no {rule}")
    body = tex.split("\\midrule", 1)[-1]
    for ch in "%_#$&":
        bare = re.findall(rf"(?<!\\){re.escape(ch)}", body) if ch != "&" else []
        if bare:
            problems.append(f"unescaped {ch}")
    return problems


def test_the_latex_check_catches_broken_tables():
    good = "\\begin{table}\n\\begin{tabular}{lr}\n\\toprule\na & b \\\\\n\\midrule\nx\\_y & 1 \\\\\n\\bottomrule\n" \
           "\\end{tabular}\n\\end{table}\n"
    assert latex_problems(good) == []
    assert "unescaped _" in latex_problems(good.replace("x\\_y", "x_y"))
    assert latex_problems(good.replace("\\end{table}", "")) != []


@pytest.mark.skipif(not (FIGURES / "tables").is_dir(), reason="no committed tables")
@pytest.mark.parametrize("path", sorted((FIGURES / "tables").glob("*.tex")), ids=lambda p: p.name)
def test_committed_latex_tables_are_well_formed_and_compile_where_a_tex_engine_exists(path, tmp_path):
    tex = path.read_text()
    assert latex_problems(tex) == []
    engine = shutil.which("pdflatex")
    if engine:
        doc = tmp_path / "doc.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\\end{document}\n")
        done = subprocess.run([engine, "-interaction=nonstopmode", doc.name], cwd=tmp_path, capture_output=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


def _difference(lo: float, hi: float) -> pd.DataFrame:
    return pd.DataFrame([dict(category="all", first="patchcore", second="padim", difference=(lo + hi) / 2,
                              difference_lo=lo, difference_hi=hi, excludes_zero=lo > 0 or hi < 0,
                              stages="own stages")])


def _unified(test_lo: float) -> pd.DataFrame:
    rows = [dict(method="patchcore", set="far", data=data, comparison="per_category - model_unified",
                 category="mean", estimate=est, lo=lo, hi=est + 0.05)
            for data, est, lo in (("test", test_lo + 0.01, test_lo), ("control_1", 0.5, 0.45))]
    return pd.DataFrame(rows)


def test_the_conclusion_says_difference_only_where_the_paired_interval_excludes_zero():
    from helpers import paper

    labels = {"patchcore": "PatchCore", "padim": "PaDiM"}
    overlapping = "\n".join(paper.conclusion({"method_difference": _difference(-0.02, 0.01),
                                              "unified_intervals": _unified(-0.01)}, [], labels))
    assert "no difference" in overlapping and "no identical shortcut shows" in overlapping
    apart = "\n".join(paper.conclusion({"method_difference": _difference(0.01, 0.04),
                                        "unified_intervals": _unified(0.02)}, [], labels))
    assert "no difference" not in apart and "partly explained away" in apart
    assert "1 of 1 (method, set)" in apart and "0 of 1 (method, set)" in overlapping

"""Rendered notebook pages: figures linked not embedded, noise stripped, identical bytes on a re-render, and the
static and browser checks catching a missing or broken image."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from helpers import render_notebooks as rn
from helpers.paths import ROOT


def png_bytes(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def figure_output(figures: Path, name: str, caption: str):
    data = base64.b64encode((figures / f"{name}.png").read_bytes()).decode()
    return new_output("display_data", data={"image/png": data, "text/plain": "<IPython.core.display.Image object>"},
                      metadata={rn.FIGURE_KEY: {"file": f"{name}.png", "caption": caption}})


def stderr(text: str):
    return new_output("stream", name="stderr", text=text)


PROGRESS = [f"\rfeatures:  {p:>3d}%|#         | {p}/100 [00:0{p // 50}<00:01, 51.{p}it/s]" for p in range(0, 101, 10)]
INLINE_PNG = png_bytes((10, 200, 10), 8)  # an output image no figure file holds: stays embedded


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder by hand: two executed notebooks, three figure files (one without its PDF)."""
    run = tmp_path / "default-abc"
    figures, notebooks = run / "figures", run / "notebooks"
    figures.mkdir(parents=True)
    notebooks.mkdir()
    for name, colour in (("examples_a", (200, 30, 30)), ("examples_b", (30, 30, 200)), ("drop", (90, 90, 90))):
        (figures / f"{name}.png").write_bytes(png_bytes(colour))
    (figures / "examples_a.pdf").write_bytes(b"%PDF-1.4\n")
    data = new_notebook(cells=[
        new_markdown_cell("# 00 · Data\nWhat the data is."),
        new_code_cell("run = Run.open(profile)", execution_count=1, outputs=[
            stderr(f"{ROOT}/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
                   "  from .autonotebook import tqdm as notebook_tqdm\n"),
            new_output("stream", name="stdout", text=f"# run default-abc -> {ROOT}/runs/default-abc\nseeds: [0, 1]\n"),
            *[stderr(line) for line in PROGRESS], stderr("\n"),
            stderr("kept: a real message on stderr\n")]),
        new_code_cell("for c in 'ab':\n    plots.save_figure(fig, f'examples_{c}', run.figures, 'Examples')",
                      execution_count=2, outputs=[figure_output(figures, "examples_a", "Examples of a <category>"),
                                                  figure_output(figures, "examples_b", "Examples of b")]),
    ])
    shift = new_notebook(cells=[
        new_markdown_cell("# 01 · Shift"),
        new_code_cell("plots.save_figure(g.figure, 'drop', run.figures, 'Drop')", execution_count=1, outputs=[
            figure_output(figures, "drop", "Drop"),
            new_output("execute_result", data={"text/plain": f"PosixPath('{ROOT}/runs/default-abc/figures/drop.png')"},
                       execution_count=1)]),
        new_code_cell("table", execution_count=2, outputs=[new_output(
            "execute_result", execution_count=2,
            data={"text/html": "<table class=\"dataframe\"><tr><td>0.912</td></tr></table>", "text/plain": "0.912"})]),
        new_code_cell("plt.show()", execution_count=3, outputs=[new_output(
            "display_data", data={"image/png": base64.b64encode(INLINE_PNG).decode(), "text/plain": "<Figure>"})]),
    ])
    nbformat.write(data, notebooks / "00_data.ipynb")
    nbformat.write(shift, notebooks / "01_shift.ipynb")
    return run


def render(run: Path) -> list[Path]:
    return rn.render_folder(run / "notebooks", run / "figures", run.name)


def test_pages_link_figures_and_leave_out_noise(run_dir: Path):
    pages = render(run_dir)
    folder = run_dir / "figures" / rn.PAGES
    assert [p.name for p in pages] == ["00_data.html", "01_shift.html", "index.html"]
    data, shift = (folder / "00_data.html").read_text(), (folder / "01_shift.html").read_text()
    for name in ("examples_a", "examples_b", "drop"):
        linked = base64.b64encode((run_dir / "figures" / f"{name}.png").read_bytes()).decode()
        assert linked not in data + shift
    assert 'src="../examples_a.png"' in data and 'src="../examples_b.png"' in data and 'src="../drop.png"' in shift
    assert 'href="../examples_a.pdf"' in data and "examples_b.pdf" not in data  # a PDF link only where one exists
    assert "Examples of a &lt;category&gt;" in data
    assert "features:" not in data and "it/s" not in data and "TqdmWarning" not in data and "autonotebook" not in data
    assert "kept: a real message on stderr" in data
    assert str(ROOT) not in data + shift and "runs/default-abc" in data
    assert "PosixPath" not in shift  # save_figure's return value, shown after the figure itself
    assert "0.912" in shift  # other outputs stay
    assert base64.b64encode(INLINE_PNG).decode() in shift  # an image no file holds stays embedded
    assert "cdn" not in (data + shift).lower() and "<script" not in data + shift  # nothing fetched from the web
    assert rn.check_pages(folder, browser=False, log=lambda _: None) == []


def test_rendering_twice_gives_identical_bytes(run_dir: Path, tmp_path: Path):
    first = {p.name: p.read_bytes() for p in render(run_dir)}
    # Again in a fresh process with another hash seed, as a later run of the study would.
    code = ("import sys; from pathlib import Path; from helpers.render_notebooks import render_folder; "
            "run = Path(sys.argv[1]); render_folder(run / 'notebooks', run / 'figures', run.name)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, env=env, cwd=ROOT)
    second = {p.name: p.read_bytes() for p in (run_dir / "figures" / rn.PAGES).glob("*.html")}
    assert second == first


def test_pages_of_removed_notebooks_go(run_dir: Path):
    render(run_dir)
    (run_dir / "notebooks" / "01_shift.ipynb").unlink()
    pages = render(run_dir)
    assert sorted(p.name for p in (run_dir / "figures" / rn.PAGES).glob("*.html")) == ["00_data.html", "index.html"]
    assert "01_shift" not in pages[-1].read_text()


def test_no_executed_notebooks_is_a_clear_error(tmp_path: Path):
    (tmp_path / "notebooks").mkdir()
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        rn.render_folder(tmp_path / "notebooks", tmp_path / "figures")


def test_static_check_flags_a_missing_figure(run_dir: Path):
    render(run_dir)
    (run_dir / "figures" / "examples_b.png").unlink()
    problems = rn.check_pages(run_dir / "figures" / rn.PAGES, browser=False, log=lambda _: None)
    assert problems and all("examples_b.png" in p for p in problems)
    assert any(p.startswith("00_data.html: <img> ../examples_b.png") for p in problems)


def test_static_check_flags_an_embedded_figure(run_dir: Path):
    render(run_dir)
    page = run_dir / "figures" / rn.PAGES / "extra.html"
    embedded = base64.b64encode((run_dir / "figures" / "drop.png").read_bytes()).decode()
    page.write_text(f'<html><body><img src="data:image/png;base64,{embedded}"></body></html>')
    assert rn.static_problems(page) == ["extra.html: embeds drop.png instead of linking it"]


def test_strip_stream_keeps_what_a_terminal_ends_with():
    text = "a\rab\rabc\nwarn.py:3: UserWarning: careful\n  warnings.warn(x)\nlast\n"
    assert rn.strip_stream(text, stderr=True) == "abc\nlast\n"
    assert rn.strip_stream(text, stderr=False) == "abc\nwarn.py:3: UserWarning: careful\n  warnings.warn(x)\nlast\n"
    assert rn.strip_stream("\rgenerate data: 0it [00:00, ?it/s]\n", stderr=True) == ""
    assert rn.strip_stream("fit: 100%|##| 27/27 [1:02:56<00:00,  6.55s/it, loss=0.1]", stderr=True) == ""


@pytest.mark.skipif(rn.find_chromium() is None, reason="no Chromium on this machine: browser check not run")
def test_browser_check_sees_images_load_and_fail(run_dir: Path):
    pages = render(run_dir)
    assert rn.browser_problems(pages, rn.find_chromium()) == []
    broken = pages[0].with_name("broken.html")
    broken.write_text(pages[0].read_text().replace('src="../examples_a.png"', 'src="../gone.png"', 1))
    problems = rn.browser_problems([broken], rn.find_chromium())
    assert "broken.html: image ../gone.png did not load" in problems
    # an image file that exists but is not an image is caught only by the browser
    (run_dir / "figures" / "examples_b.png").write_bytes(b"not a png")
    assert rn.static_problems(pages[0]) == []
    assert rn.browser_problems([pages[0]], rn.find_chromium()) == ["00_data.html: image ../examples_b.png did not load"]


def test_save_figure_shows_the_saved_png_in_a_kernel(tmp_path: Path):
    """End to end: save_figure in a real kernel leaves an output holding the file's own bytes and naming it, and
    the rendered page links the file instead."""
    from nbclient import NotebookClient

    figures = tmp_path / "run" / "figures"
    nb = new_notebook(cells=[new_code_cell(
        "import matplotlib.pyplot as plt\nfrom helpers import plots\nfig, ax = plt.subplots(figsize=(2, 2))\n"
        f"ax.plot([0, 1])\nplots.save_figure(fig, 'line', {str(figures)!r}, 'A line')")])
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    shown = [o for o in nb.cells[0].outputs if o.output_type == "display_data"]
    assert len(shown) == 1  # the figure once: closed after saving, so the inline backend does not show it again
    assert base64.b64decode(shown[0].data["image/png"]) == (figures / "line.png").read_bytes()
    assert shown[0].metadata[rn.FIGURE_KEY] == {"file": "line.png", "caption": "A line"}
    (tmp_path / "run" / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "run" / "notebooks" / "00_line.ipynb")
    page = render(tmp_path / "run")[0].read_text()
    assert 'src="../line.png"' in page and "base64" not in page and "PosixPath" not in page


def test_save_figure_outside_a_kernel_only_writes_files(tmp_path: Path, capsys):
    import matplotlib.pyplot as plt

    from helpers import plots

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1])
    path = plots.save_figure(fig, "line", tmp_path, "A line")
    assert path == tmp_path / "line.png" and (tmp_path / "line.pdf").is_file()
    assert capsys.readouterr().out == ""


def test_command_line_renders_a_profiles_run_and_fails_on_a_broken_page(run_dir: Path, tmp_path: Path, capsys):
    import shutil

    from helpers.paths import Run

    args = ["--profile", "default", "--set", f"output.runs_dir={tmp_path / 'runs'}", "--no-browser"]
    assert rn.main(args) == 2 and "no executed notebooks" in capsys.readouterr().err
    run = Run.open("default", {"output.runs_dir": str(tmp_path / "runs")})
    shutil.copytree(run_dir / "notebooks", run.notebooks, dirs_exist_ok=True)
    shutil.copytree(run_dir / "figures", run.figures, dirs_exist_ok=True)
    assert rn.main(args) == 0
    out = capsys.readouterr().out
    assert "00_data.html:" in out and "kB" in out and "browser check SKIPPED" in out
    assert (run.figures / rn.PAGES / "01_shift.html").is_file()
    (run.figures / "drop.png").unlink()
    assert rn.main(args) == 1
    assert "01_shift.html: <img> ../drop.png points at a missing file" in capsys.readouterr().err

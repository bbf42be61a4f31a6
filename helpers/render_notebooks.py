"""A run's executed notebooks as static HTML pages a reviewer opens in any browser, and the check that they work.

``python -m helpers.render_notebooks --profile NAME [--set key=value ...] [--no-browser]``

Pages land in ``<run>/figures/notebooks/NN_name.html`` beside an ``index.html``, so publishing the run's figures
folder carries them to ``figures/notebooks/``. A figure that :func:`helpers.plots.save_figure` showed is linked
from the figures folder (``../<name>.png``), not embedded again; progress bars and Python warnings are left out;
paths under the repository are written relative to it. The same executed notebooks always give the same bytes.
The check resolves every local link and image of every page, and, where Chromium is installed, opens each page
headless and reads back whether each image loaded.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote, urlsplit

from helpers.paths import ROOT, Run, atomic_write

PAGES = "notebooks"  # the pages' folder inside a figures folder
INDEX = "index.html"
# Output metadata key save_figure writes: {"file": "<name>.png", "caption": "..."}, the file relative to the
# figures folder the figure was saved in.
FIGURE_KEY = "figure"
EXECUTED = "[0-9][0-9]_*.ipynb"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# What Chromium needs on these machines (root, no network, no display), and a fresh profile per page.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=10000")
CHECK_ID = "render-check"

# tqdm's meter ends in "[elapsed<remaining, rate]" or "[elapsed, rate]"; its timings change on every run.
_PROGRESS = re.compile(r"\[\s*(?:\d+:)?\d{2}:\d{2}(?:<(?:(?:\d+:)?\d{2}:\d{2}|\?))?,[^\]]*\]\s*$")
# "path:line: SomeWarning: message"; the source line the warnings module prints under it is indented.
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")
_PATH_REPR = re.compile(r"^(?:Posix|Windows)?Path\('(?P<path>[^']*)'\)$")


# --- one notebook -------------------------------------------------------------------------------------------

def strip_stream(text: str, stderr: bool) -> str:
    """What a terminal would show at the end, less progress-bar lines and (on stderr) Python warnings."""
    kept, skip_source = [], False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.rsplit("\r", 1)[-1]  # a carriage return redraws the line: only its last state stays
        if stderr and _WARNING.match(line):
            skip_source = True
            continue
        if skip_source and line.startswith((" ", "\t")):
            continue
        skip_source = False
        if not _PROGRESS.search(line):
            kept.append(line)
    out = "\n".join(kept)
    return "" if not out.strip() else out


def _relative_paths(text: str, root: Path) -> str:
    # Executed copies print absolute paths of whoever ran them; relative ones read the same in every clone.
    pattern = re.compile(re.escape(str(root).rstrip("/")) + r"(/|(?![\w.-]))")
    return pattern.sub(lambda m: "" if m.group(1) == "/" else ".", text)


def _figure_html(figure: dict, figures_dir: Path, page_dir: Path) -> str:
    file = str(figure.get("file", ""))
    caption = html.escape(str(figure.get("caption", "")), quote=True)

    def href(name: str) -> str:
        return quote(Path(os.path.relpath(figures_dir / name, page_dir)).as_posix())

    png = href(file)
    parts = [f'<figure class="study-figure"><a href="{png}"><img src="{png}" alt="{caption}"></a>',
             f"<figcaption>{caption}"]
    pdf = Path(file).with_suffix(".pdf").as_posix()
    if (figures_dir / pdf).is_file():
        parts.append(f' <a href="{href(pdf)}">PDF</a>')
    parts.append("</figcaption></figure>")
    return "".join(parts)


def _clean_outputs(outputs: list, figures_dir: Path, page_dir: Path, root: Path) -> list:
    """The outputs a page shows; changes the outputs it is given, so it is given a copy's."""
    merged: list = []
    for out in outputs:  # consecutive writes to one stream are one text, as a terminal shows them
        if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == out.name):
            merged[-1].text += out.text
        else:
            merged.append(out)
    shown_figures, kept = set(), []
    for out in merged:
        if out.output_type == "stream":
            out.text = _relative_paths(strip_stream(out.text, out.name == "stderr"), root)
            if out.text:
                kept.append(out)
        elif out.output_type == "error":
            out.evalue = _relative_paths(out.evalue, root)
            out.traceback = [_relative_paths(line, root) for line in out.traceback]
            kept.append(out)
        elif FIGURE_KEY in out.get("metadata", {}) and "image/png" in out.get("data", {}):
            figure = out.metadata[FIGURE_KEY]
            shown_figures.add(Path(str(figure.get("file", ""))).name)
            out.data = {"text/html": _figure_html(figure, figures_dir, page_dir)}
            out.metadata = {}
            kept.append(out)
        else:
            for mime in ("text/plain", "text/html", "text/markdown"):
                if isinstance(out.get("data", {}).get(mime), str):
                    out.data[mime] = _relative_paths(out.data[mime], root)
            kept.append(out)
    # save_figure returns the PNG's path; as a cell's last expression its repr would follow the figure itself.
    return [out for out in kept if not _is_shown_path(out, shown_figures)]


def _is_shown_path(out, shown_figures: set[str]) -> bool:
    if out.output_type != "execute_result" or set(out.get("data", {})) != {"text/plain"}:
        return False
    match = _PATH_REPR.match(out.data["text/plain"].strip())
    return bool(match) and Path(match["path"]).name in shown_figures


def prepare_notebook(nb, figures_dir: Path, page_dir: Path, root: Path = ROOT):
    """A copy of an executed notebook ready to render: figures linked, noise stripped, cell ids by position
    (papermill gives its injected cell a random id on every execution)."""
    import copy

    nb = copy.deepcopy(nb)
    for number, cell in enumerate(nb.cells):
        if "id" in cell:
            cell.id = f"cell-{number:02d}"
        if cell.cell_type == "code":
            cell.outputs = _clean_outputs(cell.outputs, Path(figures_dir), Path(page_dir), Path(root))
    return nb


def _title(nb, stem: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
            break
    return stem


# --- pages --------------------------------------------------------------------------------------------------

# Small and fixed (not nbconvert's 300 kB theme, which also pulls scripts from a CDN): the pages work offline
# and do not change when JupyterLab's theme does.
STYLE = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;margin:0}
main{max-width:1100px;margin:0 auto;padding:1em 1.5em 4em}
nav{background:#f3f3f3;border-bottom:1px solid #ddd;padding:.5em 1.5em;font-size:13px}
nav a{margin-right:.9em}nav strong{margin-right:.9em}
a{color:#0b5cad}
.cell{margin:.6em 0}
.input_prompt,.output_prompt{color:#888;font:12px monospace}
.input_area{background:#f7f7f7;border:1px solid #e3e3e3;border-radius:3px}
pre{margin:0;padding:.5em .7em;overflow-x:auto;font:12.5px/1.4 Menlo,Consolas,monospace;white-space:pre-wrap}
.output_area{margin:.2em 0}
.output_stderr{background:#fff5f5}
.rendered_html table,.dataframe{border-collapse:collapse;font-size:12.5px;margin:.4em 0}
.rendered_html th,.rendered_html td{border:1px solid #ddd;padding:.2em .5em;text-align:right}
.rendered_html thead th{background:#f3f3f3}
.rendered_html tbody tr:nth-child(odd){background:#fafafa}
.output_html{overflow-x:auto}
img{max-width:100%;height:auto}
figure.study-figure{margin:.5em 0}figcaption{font-size:13px;color:#444}
.anchor-link{visibility:hidden;margin-left:.3em;text-decoration:none}
h1:hover .anchor-link,h2:hover .anchor-link,h3:hover .anchor-link{visibility:visible}
.highlight .c,.highlight .c1,.highlight .cm{color:#3d7b7b;font-style:italic}
.highlight .k,.highlight .kn,.highlight .kc,.highlight .kd,.highlight .ow{color:#008000;font-weight:bold}
.highlight .s,.highlight .s1,.highlight .s2,.highlight .sa,.highlight .si,.highlight .sd{color:#ba2121}
.highlight .mi,.highlight .mf{color:#666}.highlight .nb{color:#008000}
.highlight .nf{color:#0000ff}.highlight .nn{color:#0000ff;font-weight:bold}
.ansi-red-fg{color:#b22b31}.ansi-green-fg{color:#007427}.ansi-yellow-fg{color:#b27d12}
.ansi-blue-fg{color:#0065ca}.ansi-cyan-fg{color:#0e7d8a}.ansi-bold{font-weight:bold}
""".strip()


def _page(title: str, body: str, nav: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>\n"
            f"<nav>{nav}</nav>\n<main>\n{body.strip()}\n</main>\n</body>\n</html>\n")


def _nav(run_name: str, stems: list[str], current: str | None) -> str:
    parts = [f"<strong>{html.escape(run_name)}</strong>",
             "<strong>index</strong>" if current is None else f'<a href="{INDEX}">index</a>']
    for stem in stems:
        parts.append(f"<strong>{stem}</strong>" if stem == current else f'<a href="{quote(stem)}.html">{stem}</a>')
    return " ".join(parts)


def _write_if_changed(path: Path, text: str) -> Path:
    data = text.encode("utf-8")
    if not path.is_file() or path.read_bytes() != data:
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def render_folder(notebooks_dir: str | Path, figures_dir: str | Path, run_name: str = "",
                  root: Path = ROOT) -> list[Path]:
    """Render every executed ``NN_name.ipynb`` in ``notebooks_dir`` to ``<figures_dir>/notebooks/NN_name.html``
    plus an index; pages of notebooks no longer there are removed. Returns the pages, index last."""
    import nbformat
    from nbconvert import HTMLExporter

    notebooks_dir, figures_dir = Path(notebooks_dir), Path(figures_dir)
    sources = sorted(notebooks_dir.glob(EXECUTED))
    if not sources:
        raise FileNotFoundError(f"no executed notebooks {EXECUTED} in {notebooks_dir}: run the study first")
    page_dir = figures_dir / PAGES
    run_name = run_name or notebooks_dir.parent.name
    stems = [p.stem for p in sources]
    exporter = HTMLExporter(template_name="basic")
    pages, titles = [], []
    for source in sources:
        try:
            nb = nbformat.read(source, as_version=4)
        except Exception as exc:  # nbformat raises several types for a damaged file
            raise ValueError(f"{source} is not a readable notebook: {exc}") from None
        body, _ = exporter.from_notebook_node(prepare_notebook(nb, figures_dir, page_dir, root))
        title = _title(nb, source.stem)
        titles.append(title)
        page = _page(f"{title} · {run_name}", body, _nav(run_name, stems, source.stem))
        pages.append(_write_if_changed(page_dir / f"{source.stem}.html", page))
    items = "\n".join(f'<li><a href="{quote(stem)}.html">{stem}</a>: {html.escape(title)}</li>'
                      for stem, title in zip(stems, titles))
    body = (f"<h1>Executed notebooks of run {html.escape(run_name)}</h1>\n<p>In the order the study runs them; "
            f"figures link to the files in the folder above (<a href=\"../\">figures</a>).</p>\n<ol>\n{items}\n</ol>")
    pages.append(_write_if_changed(page_dir / INDEX, _page(f"Notebooks · {run_name}", body, _nav(run_name, stems,
                                                                                                   None))))
    for old in page_dir.glob("*.html"):
        if old not in pages:
            old.unlink()
    return pages


def render_run(run: Run) -> list[Path]:
    """The run's executed notebooks as pages in ``<run>/figures/notebooks/``, index last."""
    return render_folder(run.notebooks, run.figures, run.name)


# --- checks -------------------------------------------------------------------------------------------------

class _Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []  # (tag, url)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is not None and (name, tag) in {("src", "img"), ("src", "script"), ("src", "source"),
                                                      ("href", "a"), ("href", "link")}:
                self.refs.append((tag, value))


def _local_target(url: str, page_dir: Path) -> Path | None:
    """The file a link points at, or None when it is not a local file (web address, data URI, in-page anchor)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme or parts.netloc or not parts.path:
        return None
    return page_dir / unquote(parts.path)


def static_problems(page: str | Path) -> list[str]:
    """Local links and images of one page that point at no file, and figures of its folder's parent embedded
    instead of linked."""
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    problems = []
    for tag, url in parser.refs:
        target = _local_target(url, page.parent)
        if target is not None and not target.exists():
            problems.append(f"{page.name}: <{tag}> {url} points at a missing file")
    embedded = [url for tag, url in parser.refs if tag == "img" and url.startswith("data:image/png;base64,")]
    if embedded:
        figures = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in page.parent.parent.glob("*.png")}
        for url in embedded:
            digest = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
            if digest in figures:
                problems.append(f"{page.name}: embeds {figures[digest]} instead of linking it")
    return problems


def find_chromium() -> str | None:
    """Chromium or Chrome on this machine (``CHROMIUM`` names one explicitly), or None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


# Runs after every image has loaded or failed; the result lands in the DOM that --dump-dom prints.
_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var refs = [];
  document.querySelectorAll('a[href], link[href]').forEach(function (e) { refs.push(e.href); });
  document.querySelectorAll('script[src], source[src]').forEach(function (e) { refs.push(e.src); });
  var out = {images: Array.from(document.images).map(function (i) {
    return {src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0}; }), refs: refs};
  var pre = document.createElement('pre'); pre.id = '%s'; pre.hidden = true;
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>""" % CHECK_ID


def browser_problems(pages: list[Path], chromium: str, timeout: float = 60) -> list[str]:
    """Open each page in headless Chromium: problems where a page did not load, an image did not load
    (naturalWidth 0) or a link the browser resolved points at a missing local file."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="render-check-") as tmp:
        for number, page in enumerate(pages):
            page = Path(page).resolve()
            # A copy with the check script, elsewhere: <base> makes its relative links resolve as the page's do,
            # and nothing is written beside the pages.
            text = page.read_text(encoding="utf-8")
            base = f'<base href="{page.parent.as_uri()}/">'
            text = text.replace("<head>", "<head>\n" + base, 1) if "<head>" in text else base + text
            end = "</body>" if "</body>" in text else None
            text = text.replace(end, _CHECK_SCRIPT + "\n" + end, 1) if end else text + _CHECK_SCRIPT
            probe = Path(tmp) / f"page{number}.html"
            probe.write_text(text, encoding="utf-8")
            command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / f'profile{number}'}",
                       "--dump-dom", probe.as_uri()]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"{page.name}: the browser did not finish loading it in {timeout:.0f} s")
                continue
            found = re.search(rf'<pre id="{CHECK_ID}"[^>]*>(.*?)</pre>', done.stdout, re.S)
            if not found:
                err = (done.stderr.strip().splitlines() or ["no output"])[-1]
                problems.append(f"{page.name}: the browser did not load it (exit {done.returncode}: {err})")
                continue
            result = json.loads(html.unescape(found.group(1)))
            problems += [f"{page.name}: image {img['src']} did not load" for img in result["images"]
                         if not img["loaded"]]
            for url in result["refs"]:
                target = _local_target(url, page.parent)
                if target is not None and not target.exists():
                    problems.append(f"{page.name}: link {url} points at a missing file")
    return problems


def check_pages(folder: str | Path, browser: bool | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Problems with the pages in ``folder`` (empty: all good). The static check always runs; the browser
    check runs where Chromium is found (``browser=None``), always (``True``: a missing Chromium is a problem)
    or never (``False``). ``log`` says which ran."""
    folder = Path(folder)
    pages = sorted(folder.glob("*.html"))
    if not pages:
        return [f"no HTML pages in {folder}"]
    problems = [p for page in pages for p in static_problems(page)]
    log(f"[notebooks-html] static check: {len(pages)} pages, every local link and image resolved"
        if not problems else f"[notebooks-html] static check: {len(problems)} problems in {len(pages)} pages")
    chromium = find_chromium() if browser is not False else None
    if chromium is None:
        if browser:
            problems.append("browser check asked for, but no Chromium found (install chromium or set CHROMIUM)")
        else:
            log("[notebooks-html] browser check SKIPPED: no Chromium on this machine (static check only)")
        return problems
    found = browser_problems(pages, chromium)
    log(f"[notebooks-html] browser check ({Path(chromium).name}): {len(pages)} pages opened, "
        + ("every image loaded" if not found else f"{len(found)} problems"))
    return problems + found


# --- command line -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="profiles/<name>.yaml or a path to a YAML profile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one configuration value, as for helpers.study (repeatable)")
    check = parser.add_mutually_exclusive_group()
    check.add_argument("--browser", dest="browser", action="store_true", default=None,
                       help="require the headless-browser check (fail when no Chromium is found)")
    check.add_argument("--no-browser", dest="browser", action="store_false", help="static check only")
    args = parser.parse_args(argv)
    from helpers.config import ProfileError

    try:
        from helpers.study import parse_set  # the runner's own --set parser

        run = Run.open(args.profile, parse_set(args.set) or None)
        pages = render_run(run)
    except (ProfileError, FileNotFoundError, ValueError) as exc:
        print(f"[notebooks-html] error: {exc}", file=sys.stderr)
        return 2
    for page in pages:
        shown = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
        print(f"[notebooks-html] {shown}: {page.stat().st_size / 1024:.1f} kB")
    problems = check_pages(pages[0].parent, args.browser)
    for problem in problems:
        print(f"[notebooks-html] problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

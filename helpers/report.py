"""The paper's tables and REPORT.md, assembled from one run's saved result tables only (the report never
recomputes a model). Every number the report states is formatted from a table that is exported beside it, so a
test can trace each one back (tests/test_report.py)."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from helpers.paths import Run, atomic_write, write_csv

# --- tables -------------------------------------------------------------------------------------------------


def load_results(run: Run, table: str) -> pd.DataFrame:
    """Every ``results.csv`` under the run's ``results/<table>/``, concatenated; empty frame if none. Only this
    run's folder is read, so another configuration's results can never enter its tables."""
    folder = run.dir / "results" / table
    frames = [pd.read_csv(p, keep_default_na=True) for p in sorted(folder.rglob("results.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_table(df: pd.DataFrame, name: str, tables_dir: str | Path, caption: str, float_format: str = "%.3f") -> Path:
    """The same table as CSV, Markdown and LaTeX (booktabs), with the caption kept beside it. The CSV keeps full
    precision; the Markdown and LaTeX copies round to ``float_format``."""
    folder = Path(tables_dir)
    write_csv(df, folder / f"{name}.csv")
    atomic_write(folder / f"{name}.md", lambda tmp: tmp.write_text(f"{caption}\n\n{markdown(df, float_format)}\n"))
    latex = df.to_latex(index=False, float_format=lambda x: float_format % x, caption=caption, label=f"tab:{name}",
                        escape=True, na_rep="n/a")
    atomic_write(folder / f"{name}.tex", lambda tmp: tmp.write_text(latex))
    return folder / f"{name}.csv"


def markdown(df: pd.DataFrame, float_format: str = "%.3f") -> str:
    """A Markdown table with missing values shown as 'n/a' (tabulate would print 'nan')."""
    shown = df.copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = [float_format % v if pd.notna(v) else np.nan for v in shown[col]]
    return shown.astype(object).where(shown.notna(), "n/a").to_markdown(index=False, disable_numparse=True)


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    caption: str


def num(value: float, digits: int = 3) -> str:
    """How the report prints a number from a table: fixed digits (a test matches it back to the table)."""
    return f"{value:.{digits}f}"


def interval(estimate: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{num(estimate, digits)} [{num(lo, digits)}, {num(hi, digits)}]"


def pct(value: float) -> str:
    """A rate from a table as a percentage (the test divides by 100 again)."""
    return f"{100 * value:.0f} %"


def bullet(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines if line)


def flatten(config: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) pairs of a nested configuration mapping."""
    out = []
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out += flatten(value, name)
        else:
            out.append((name, value if not isinstance(value, list) else ", ".join(map(str, value))))
    return out


def hardware() -> str:
    import os

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def efficiency_times(eff: pd.DataFrame) -> str:
    """The measured costs (seconds, milliseconds, MiB of peak memory) as a Markdown section for ``run_times.md``:
    they change from run to run, so they stay out of the report and its tables."""
    if eff.empty:
        return ""
    cols = ["fit_s", "infer_ms_per_image", "fit_peak_mb", "infer_peak_mb"]
    means = eff.groupby("method")[cols].mean().round(1).reset_index()
    measured = ", ".join(sorted(eff["category"].unique()))
    return ("## Cost of each method\n\nFitted from scratch with an empty feature cache on " + measured
            + " and timed on its test split (backbone included); peak memory is the resident set above its level "
            "at the start of each phase.\n\n" + markdown(means, "%.1f") + "\n")


# --- every stated number from a table -------------------------------------------------------------------------

_CODE = r"`[^`]*`"
_LINK = r"!?\[[^\]]*\]\([^)]*\)"
_DECIMAL = r"(?<![\w.])-?\d+\.\d+(?![\w.])"  # 0.926, -0.008; not 2.14.1 or blocks.2
_PERCENT = r"(?<![\w.])(\d+) %"


def stated_numbers(text: str) -> tuple[list[str], list[int]]:
    """The decimals and percentages a report states, outside headings, code spans and links (names such as
    `blocks.2`)."""
    import re

    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))  # not headings
    prose = re.sub(_LINK, " ", re.sub(_CODE, " ", body))
    return re.findall(_DECIMAL, prose), [int(p) for p in re.findall(_PERCENT, prose)]


def table_values(tables_dir: str | Path) -> tuple[set[str], list[float]]:
    """Every cell of every CSV table: numbers formatted as the report formats them (3 decimals), raw text cells,
    and the numeric values themselves (for percentages)."""
    formatted, values = set(), []
    for path in sorted(Path(tables_dir).glob("*.csv")):
        frame = pd.read_csv(path)
        for col in frame.columns:
            for v in frame[col].dropna():
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    formatted.update({f"{float(v):.3f}", f"{float(v):.2f}", f"{float(v):.1f}"})
                    values.append(float(v))
                else:
                    formatted.update(str(v).replace(",", " ").split())
    return formatted, values


def untraceable_numbers(text: str, tables_dir: str | Path) -> list[str]:
    """The numbers a report states that no exported table holds (as printed, or as a percentage of a rate)."""
    decimals, percents = stated_numbers(text)
    formatted, values = table_values(tables_dir)
    rates = {round(100 * v) for v in values if -10 <= v <= 10}
    missing = [d for d in decimals if d not in formatted and d.lstrip("-") not in formatted]
    missing += [f"{p} %" for p in percents if p not in rates]
    return missing


def without_images(text: str) -> str:
    """The report's text without its figure lines, for showing it where its relative figure links do not resolve
    (a notebook page)."""
    import re

    return re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$", "", text, flags=re.M)

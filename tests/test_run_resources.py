"""What the runner records per step: seconds, peak memory of the kernel and its worker processes, GPU memory, disk
use of the study's folders, and the per-batch timings of every run_jobs call (for helpers.plan)."""
import json
import os
import stat
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers import parallel, plan, study
from helpers.config import deep_merge
from helpers.paths import PROFILES, Run

HELD_BYTES = 300_000_000

# A step that writes 2 MB into the data folder, runs two jobs through run_jobs, and has a child process hold
# HELD_BYTES resident for a while: the peak must count the kernel's descendants, not just the kernel.
STEP = f"""
import subprocess, sys
from pathlib import Path
from helpers.parallel import run_jobs
from helpers.paths import Run
run = Run.open(profile, overrides)
root = Path(run.config.data.root)
root.mkdir(parents=True, exist_ok=True)
(root / "blob.bin").write_bytes(b"x" * 2_000_000)
print(run_jobs(pow, [(2, 3), (3, 2)], 1, desc="powers", progress=False))
subprocess.run([sys.executable, "-c", "import time; held = b'x' * {HELD_BYTES}; time.sleep(2)"], check=True)
"""


def _pipeline_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name in ("00_data", "01_shift", "02_method", "04_threshold_adaptation", "05_unified", "06_report"):
        nb = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_markdown_cell(f"# {name}"),
            nbformat.v4.new_code_cell("profile = 'x'\noverrides = {}", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(STEP if name == "00_data" else "pass")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def _profile(tmp_path: Path) -> Path:
    raw = deep_merge(yaml.safe_load((PROFILES / "smoke.yaml").read_text()),
                     {"data.root": str(tmp_path / "data" / "synthetic"), "shift.root": str(tmp_path / "data" / "shift"),
                      "output": {"runs_dir": str(tmp_path / "runs"), "figures_dir": None}})
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_step_records_its_peak_memory_disk_use_and_batch_timings(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(parallel.JOB_TIMES_ENV, raising=False)
    profile = _profile(tmp_path)
    study.run(str(profile), only=["00"], log=lambda *_: None, folder=_pipeline_folder(tmp_path))
    run = Run.open(profile)
    record = json.loads((run.state / "00_data.json").read_text())
    assert record["peak_rss_bytes"] > HELD_BYTES  # the grandchild's bytes are in the peak
    assert record["disk_bytes"]["data"] >= 2_000_000 and record["disk_bytes"]["run"] > 0
    assert set(record["disk_bytes"]) == {"data", "shift", "cache", "run"}
    assert parallel.JOB_TIMES_ENV not in os.environ, "the runner leaves its own environment as it found it"
    lines = [json.loads(line) for line in (run.state / "00_data.jobs.jsonl").read_text().splitlines()]
    assert [(x["step"], x["function"], x["desc"], x["jobs"], x["ran"]) for x in lines] == \
           [("00_data", "builtins.pow", "powers", 2, 2)]
    assert 0 <= lines[0]["job_s"] <= lines[0]["wall_s"]

    study.write_run_times(run)
    table = (run.figures / study.RUN_TIMES).read_text()
    assert "| notebook | seconds | peak RAM GiB | peak GPU GiB | data | shift | cache | run |" in table
    row = next(line for line in table.splitlines() if line.startswith("| 00_data |"))
    assert float(row.split("|")[3]) >= HELD_BYTES / 2 ** 30
    summary = json.loads((run.figures / study.JOB_TIMES).read_text())
    before = {name: (run.figures / name).read_bytes() for name in (study.RUN_TIMES, study.JOB_TIMES)}
    study.write_run_times(run)  # nothing re-ran: the published files must not change (no churn in git)
    assert before == {name: (run.figures / name).read_bytes() for name in before}
    assert summary["steps"]["00_data"]["batches"] == lines and summary["profile"] == run.profile
    # the cost model reads both the run folder and the published summary
    for recorded in (plan.read_run(run.dir), plan.read_summary(run.figures / study.JOB_TIMES)):
        assert recorded.steps["00_data"]["batches"] == lines
        assert plan.image_counts(Run(recorded.profile, recorded.config))[0] == plan.image_counts(run)[0]


def test_disk_use_counts_blocks_once_per_file_and_follows_no_link(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(os.urandom(100_000))
    os.link(folder / "sub" / "a.bin", folder / "hard.bin")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(1_000_000))
    os.symlink(outside, folder / "link")
    one_file = os.stat(folder / "hard.bin").st_blocks * 512
    assert one_file <= study.disk_use(folder) < one_file + 100_000  # the file once; the link's target not at all
    assert study.disk_use(tmp_path / "missing") == 0


def test_gpu_memory_is_read_from_nvidia_smi_and_none_without_it(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 1024\necho 512\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert study.gpu_memory_used() == (1024 + 512) * 2 ** 20
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert study.gpu_memory_used() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_appends_one_timing_line_per_call(tmp_path, monkeypatch, workers):
    import time

    path = tmp_path / "times.jsonl"
    monkeypatch.setattr(parallel, "job_times_file", path)
    monkeypatch.setenv(parallel.STEP_ENV, "02_x")
    jobs = [(0.05,), (0.1,)]
    assert parallel.run_jobs(time.sleep, jobs, workers, desc="naps", progress=False) == [None, None]
    parallel.run_jobs(abs, [(-1,)], 1, desc="memo", progress=False, memo=True, cache_dir=tmp_path / "jobs")
    parallel.run_jobs(abs, [(-1,)], 1, desc="memo", progress=False, memo=True, cache_dir=tmp_path / "jobs")
    first, fresh, cached = [json.loads(x) for x in path.read_text().splitlines()]
    assert (first["step"], first["function"], first["jobs"], first["ran"], first["workers"]) == \
           ("02_x", "time.sleep", 2, 2, workers)
    assert first["job_s"] >= 0.15 and first["job_max_s"] >= 0.1  # each job's own seconds, measured where it ran
    assert (fresh["ran"], cached["ran"], cached["job_s"]) == (1, 0, 0)  # a job from the cache did not run
    if workers > 1:
        parallel.shutdown()


def test_nothing_is_recorded_without_a_timings_file(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "job_times_file", None)
    monkeypatch.delenv(parallel.JOB_TIMES_ENV, raising=False)
    assert parallel.record_batch(abs, "x", 1, 1, 1, "local", 0.1, [0.1]) is None
    monkeypatch.setenv(parallel.JOB_TIMES_ENV, str(tmp_path / "t.jsonl"))
    assert parallel.record_batch(abs, "x", 1, 1, 1, "local", 0.1, [0.1]) == tmp_path / "t.jsonl"


def test_resources_are_sampled_over_the_process_tree():
    import subprocess

    with study.StepMonitor(interval_s=0.05) as monitor:
        subprocess.run([sys.executable, "-c", f"import time; held = b'x' * {HELD_BYTES}; time.sleep(1)"], check=True)
    assert monitor.peak_rss > HELD_BYTES


def test_jobs_on_dask_are_timed_where_they_run(tmp_path, monkeypatch):
    import time

    pytest.importorskip("distributed")
    from helpers.config import ExecutionConfig

    path = tmp_path / "times.jsonl"
    monkeypatch.setattr(parallel, "job_times_file", path)
    try:
        parallel.run_jobs(time.sleep, [(0.1,), (0.1,)], ExecutionConfig(workers=1, engine="dask"), progress=False)
    finally:
        parallel.close_dask()
    line = json.loads(path.read_text())
    assert (line["engine"], line["jobs"], line["ran"]) == ("dask", 2, 2) and line["job_s"] >= 0.2

"""The cost model: the batches a profile implies are the ones the code runs, the image counts are the manifest's, and
an estimate from a recorded run reproduces that run."""
import json

import pytest

from helpers import parallel, plan, splits
from helpers.config import load
from helpers.paths import Run
from tests.conftest import write_tiny_mvtec
from tests.helpers_run import tiny_run

SMALL_SHIFT = {"shift": {"modes": ["domain"], "transforms": ["brightness"], "severities": [1]},
               "sweep": {"shifts": [["brightness", 1]]},
               "thresholds": {"transforms": ["brightness"], "severities": [1]}}


@pytest.mark.parametrize("calib_size, val_fraction", [(None, 0.5), (3, 0.3), (5, 0.7)])
def test_split_counts_follow_make_splits(tmp_path, calib_size, val_fraction):
    root = write_tiny_mvtec(tmp_path / "d", categories=("alpha",), n_train=13, n_good=5, defects=("a", "b", "c"),
                            n_defect=3)
    manifest = splits.make_splits(root, ["alpha"], calib_size=calib_size, val_fraction=val_fraction)
    counted = plan.split_counts(13, {"good": 5, "a": 3, "b": 3, "c": 3}, calib_size, val_fraction)
    found = {s: int((manifest["split"] == s).sum()) for s in splits.SPLITS}
    found["test_good"] = int(((manifest["split"] == "test") & (manifest["label"] == 0)).sum())
    assert found == {k: v for k, v in counted.items() if k != "generated"}


def test_the_rehearsal_counts_what_the_real_mvtec_ad_run_counts(monkeypatch):
    """One from data.synthetic.per_category, the other from MVTec AD's known counts: the same images."""
    mvtec, rehearsal = (Run(name, load(name)) for name in ("mvtec", "mvtec-rehearsal"))
    assert plan.image_counts(rehearsal)[0] == plan.image_counts(mvtec)[0]
    assert plan.image_side(rehearsal) == plan.image_side(mvtec) == 1024


def test_a_detectors_cost_grows_as_its_algorithm_does():
    from helpers import registry

    cfg = load("default")
    patchcore, padim = registry.configured(cfg, "patchcore"), registry.configured(cfg, "padim")
    # PatchCore's greedy coreset compares every patch with every centre: more than linear in the images.
    assert plan.cost("patchcore").fit(patchcore, 200) > 3 * plan.cost("patchcore").fit(patchcore, 100)
    # PaDiM's covariances grow linearly with the images, its inversion not at all.
    grow = plan.cost("padim").fit(padim, 200) - plan.cost("padim").fit(padim, 100)
    assert grow == pytest.approx(plan.cost("padim").fit(padim, 300) - plan.cost("padim").fit(padim, 200))
    # Scoring against a bank twice as large (twice the training images) costs more per image.
    assert plan.cost("patchcore").score(patchcore, 10, 200) > plan.cost("patchcore").score(patchcore, 10, 100)
    assert plan.Geometry.of(patchcore.replace(image_size=320)).patches == 4 * plan.Geometry.of(patchcore).patches


def test_the_planned_batches_are_the_ones_the_code_runs_and_the_estimate_reproduces_them(tmp_path, monkeypatch,
                                                                                          capsys):
    from data_prep import prepare
    from helpers import experiments, study

    root = write_tiny_mvtec(tmp_path / "data")
    run = tiny_run(root, tmp_path, monkeypatch, SMALL_SHIFT)
    times = tmp_path / "times.jsonl"
    monkeypatch.setattr(parallel, "job_times_file", times)
    monkeypatch.setenv(parallel.STEP_ENV, "01_shift")
    prepare.build_shifts(run, experiments.shift_needs(run), progress=False)
    monkeypatch.setenv(parallel.STEP_ENV, "02_patchcore")
    experiments.run_method(run, "patchcore", progress=False)
    recorded = [json.loads(line) for line in times.read_text().splitlines()]

    counts, source = plan.image_counts(run)
    manifest = run.manifest(0)
    assert "data" in source
    assert counts["alpha"]["test"] == int(((manifest.category == "alpha") & (manifest.split == "test")).sum())
    planned = plan.batches(run, counts, measure=False)
    ran = [(b.step, b.function, b.desc, b.jobs) for b in planned if b.step in ("01_shift", "02_patchcore")][:4]
    assert ran == [(x["step"], x["function"], x["desc"], x["jobs"]) for x in recorded]
    features = next(b for b in planned if b.kind == "features")
    train, test = (sum(counts[c][s] for c in counts) for s in ("train", "test"))
    assert features.images == train + 2 * test  # clean train and test, and the shifted copy's test images

    # Fitted on its own run, the model gives that run's seconds back (the batches this test ran: shift copies, and
    # the drop study's features, fits and evaluations; 2 s of each step spent outside batches).
    steps = {}
    for step in ("01_shift", "02_patchcore"):
        lines = [x for x in recorded if x["step"] == step]
        steps[step] = {"seconds": sum(x["wall_s"] for x in lines) + 2.0, "batches": lines}
    rates = plan.fit_rates(plan.Recorded("test", run.profile, run.config, steps), measure=False)
    assert not [u for u in rates.unmatched if "01_shift" in u or "02_patchcore" in u]
    estimates = plan.estimate([b for b in planned if b.step in steps][:len(recorded)], rates, 1, 1)
    for step, record in steps.items():
        mine = [e for e in estimates if e.batch.step == step]
        total = sum(e.wall_here for e in mine) + plan.outside_seconds(step, estimates, rates)
        assert total == pytest.approx(record["seconds"], rel=1e-6)

    # The command line finds the run's recorded timings and prints them as estimates.
    run.state.mkdir(parents=True, exist_ok=True)
    for step, record in steps.items():
        (run.state / f"{step}.json").write_text(json.dumps({"fingerprint": "", "seconds": record["seconds"]}))
        (run.state / f"{step}.jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in record["batches"]))
    monkeypatch.setattr(plan, "backbone_seconds", lambda backbone, measure=True: 1.0)
    assert study.main(["--profile", str(tmp_path / "tiny.yaml"), "--plan", "--workers", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "| patchcore evaluate |" in line)
    assert "?" not in row and f"timings of {run.dir}" in out and "on 4 workers" in out


@pytest.mark.parametrize("profile", ["default", "mvtec", "mvtec-rehearsal"])
def test_the_plan_of_a_profile_prints_without_running_anything(profile, tmp_path, monkeypatch):
    from helpers import backbones

    monkeypatch.setattr(backbones, "is_available", lambda name: name == "efficientnet_lite0")
    text = plan.report(profile, {"output.runs_dir": str(tmp_path / "runs")}, workers=8, measure=False)
    assert not (tmp_path / "runs").exists(), "planning writes nothing"
    assert "| **total** |" in text and "on 8 workers" in text
    for kind in ("shift", "features", "fit", "evaluate", "sweep", "thresholds", "unified"):
        assert f"| {kind} |" in text, kind
    assert ("| generate |" in text) == (profile != "mvtec")
    if profile == "mvtec-rehearsal":
        assert "stand-in for wide_resnet50_2" in text


def test_a_recorded_batch_on_more_workers_takes_less_wall_time_but_never_less_than_its_longest_job():
    assert plan.wall_seconds(100.0, 10.0, 4, 1.0) == 26.0
    assert plan.wall_seconds(100.0, 60.0, 4, 1.0) == 61.0
    assert plan.wall_seconds(100.0, 10.0, 1, 0.0) == 100.0


@pytest.mark.parametrize("profile", ["default", "smoke", "mvtec"])
def test_the_unified_models_planned_are_the_ones_the_unified_study_fits(profile, monkeypatch):
    from helpers import backbones, unified

    monkeypatch.setattr(backbones, "is_available", lambda name: name == "efficientnet_lite0")
    run = Run(profile, load(profile))
    counts = plan.image_counts(run)[0]
    planned = next(b for b in plan.batches(run, counts, measure=False) if b.desc == "unified models")
    assert planned.jobs == planned.fits == len(unified.model_jobs(run))

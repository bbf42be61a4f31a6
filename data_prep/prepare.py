"""Make sure a run's datasets exist: generate each data draw of the synthetic data, fetch MVTec AD, or check a
folder placed by hand. Generation of one category and draw is one job of the study's job runner."""
from __future__ import annotations

import json
from pathlib import Path

from helpers.data import DatasetError, list_categories
from helpers.paths import Run, atomic_write

STAMP = ".synthetic.json"  # what a generated folder was made with; a mismatch is refused, never mixed


def _stamp(run: Run, draw: int) -> dict:
    s = run.config.data.synthetic
    stamp = {"seed": int(draw), "size": s.size, "n_train": s.n_train, "n_test_good": s.n_test_good,
             "n_per_defect": s.n_per_defect}
    if not s.ground_truth:
        stamp["ground_truth"] = False
    if s.per_category:  # only when set, so folders generated before the key existed stay valid
        stamp["per_category"] = {c: {"n_train": shape.n_train, "test": dict(shape.test), "greyscale": shape.greyscale}
                                 for c, shape in sorted(s.per_category.items())}
    return stamp


def _check_stamp(root: Path, wanted: dict) -> None:
    path = root / STAMP
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            raise DatasetError(f"{root} holds data generated with {found}, the configuration asks for {wanted}: "
                               f"remove the folder or set data.root elsewhere")


def _generate_job(root: Path, seed: int, category: str, size: int, n_train: int, n_test_good: int,
                  n_per_defect: int, ground_truth: bool = True, test: dict[str, int] | None = None,
                  greyscale: bool = False) -> None:
    import shutil

    from data_prep import synthetic

    synthetic.generate(root, seed=seed, size=size, categories=(category,), n_train=n_train,
                       n_test_good=n_test_good, n_per_defect=n_per_defect, test=test, greyscale=greyscale)
    if not ground_truth:
        # An image-level-only dataset, as many inspection datasets are: the defect folders keep their labels, no
        # pixel mask exists anywhere (the generator's canvas masks included).
        shutil.rmtree(root / category / "ground_truth")
        for mask in (root / category).rglob("*_mask.png"):
            mask.unlink()


def generate_jobs(run: Run, draw: int, root: Path) -> list[tuple]:
    """The arguments of one generation job per category of a draw (:func:`draw_categories`): the uniform sizes of
    ``data.synthetic``, or a category's own shape from ``data.synthetic.per_category``."""
    s = run.config.data.synthetic
    jobs = []
    for c in draw_categories(run, draw):
        shape = s.per_category.get(c)
        if shape is None:
            jobs.append((root, int(draw), c, s.size, s.n_train, s.n_test_good, s.n_per_defect, s.ground_truth))
        else:
            jobs.append((root, int(draw), c, s.size, shape.n_train, s.n_test_good, s.n_per_defect, s.ground_truth,
                         dict(shape.test), shape.greyscale))
    return jobs


def draw_categories(run: Run, draw: int) -> tuple[str, ...]:
    """The categories one data draw holds: the data's, and on the first draw also those only the unified study
    pools (``unified_extra_categories``, e.g. the generated look-alikes of its close set)."""
    data = run.config.data
    extra = run.config.unified_extra_categories if int(draw) == int(data.draws[0]) else ()
    return tuple(data.categories) + tuple(extra)


def ensure_datasets(run: Run, progress: bool = True) -> list[Path]:
    """Every data draw's clean dataset, generated or fetched where missing; returns their roots. The first draw
    also gets the categories only the unified study uses (:func:`draw_categories`)."""
    from helpers.parallel import run_jobs

    data = run.config.data
    roots = [run.data_root(d) for d in data.draws]
    if data.dataset == "synthetic":
        jobs = []
        for draw, root in zip(data.draws, roots):
            _check_stamp(root, _stamp(run, draw))
            jobs += [job for job in generate_jobs(run, draw, root) if not (root / job[2] / "train" / "good").is_dir()]
        run_jobs(_generate_job, jobs, run.config.execution, desc="generate data", progress=progress)
        for draw, root in zip(data.draws, roots):
            atomic_write(root / STAMP, lambda tmp, d=draw: tmp.write_text(json.dumps(_stamp(run, d), indent=1)))
    elif data.dataset == "mvtec":
        from data_prep import mvtec

        mvtec.prepare(roots[0], categories=draw_categories(run, data.draws[0]))
    else:
        missing = sorted(set(draw_categories(run, data.draws[0])) - set(list_categories(roots[0])))
        if missing:
            raise DatasetError(f"{roots[0]} lacks the categories {missing} that data.categories or unified.sets "
                               f"name")
    return roots


def _shift_job(src: Path, dst: Path, transform: str, severity: int, seed: int, mode: str, categories: list[str],
               keys: set[str]) -> Path:
    from data_prep import shift

    return shift.shift_dataset(src, dst, transform, severity, seed, categories=categories, overwrite=True,
                               progress=False, parts=shift.PARTS, mode=mode, keys=keys)


def build_shifts(run: Run, needs: dict, progress: bool = True) -> list[Path]:
    """Build the shifted copies ``needs`` names (``{(draw, Condition): {manifest split, ...}}``), each holding the
    images of those splits; a copy that already holds them is kept, one that lacks some is rebuilt with the
    union. Where several draws share one copy (real data: the draws are split seeds of the same images), the copy
    holds the union of what every draw needs. Copies are jobs of the study's job runner, each written aside and
    renamed into place."""
    from data_prep import shift
    from helpers.parallel import run_jobs

    cfg = run.config
    categories = list(cfg.data.categories)
    manifests = {draw: run.manifest(draw) for draw in {d for d, _ in needs}}
    wanted: dict[Path, tuple] = {}
    for (draw, condition), split_names in sorted(needs.items()):
        manifest = manifests[draw]
        chosen = manifest[manifest["split"].isin(split_names) & manifest["category"].isin(categories)]
        dst = run.shift_copy(draw, condition.mode, condition.transform, condition.severity)
        if dst in wanted:
            wanted[dst][2].update(chosen["image"])
        else:
            wanted[dst] = (run.data_root(draw), condition, set(chosen["image"]))
    jobs = []
    for dst, (src, condition, keys) in wanted.items():
        have = shift.read_manifest(dst)
        if have is not None and shift.is_complete(dst, condition.transform, condition.severity, cfg.shift.seed,
                                                   categories, condition.mode):
            if keys <= set(have["image"]):
                continue
            keys |= set(have["image"])
        jobs.append((src, dst, condition.transform, condition.severity, cfg.shift.seed, condition.mode, categories,
                     keys))
    run_jobs(_shift_job, jobs, cfg.execution, desc="shift conditions", progress=progress)
    return list(wanted)

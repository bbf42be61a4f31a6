"""The typed configuration: defaults in one place, every key and type checked, a run folder per configuration."""
import subprocess
import sys

import pytest
import yaml

from helpers import config
from helpers.config import ProfileError
from helpers.paths import PROFILES, ROOT, Run

MINIMAL = {"data": {"dataset": "synthetic", "root": "data/x", "categories": ["carpet"]}}


def write(tmp_path, raw, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path):
    cfg = config.load(path)
    assert cfg.data.categories and cfg.methods


def test_a_profile_states_only_what_differs_and_the_rest_comes_from_the_dataclasses(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.model == config.ModelConfig()
    assert cfg.shift == config.ShiftConfig()
    assert set(cfg.methods) == set(config.DEFAULT_METHODS)
    from helpers import registry

    assert cfg.methods["patchcore"] == registry.get("patchcore").settings()


@pytest.mark.parametrize("patch, message", [
    ({"methods": {"patchcore": {"coreset_ration": 0.1}}},
     r"unknown key 'methods.patchcore.coreset_ration' \(did you mean 'methods.patchcore.coreset_ratio'\?\)"),
    ({"modle": {}}, r"unknown key 'modle' \(did you mean 'model'\?\)"),
    ({"model": {"image_size": "big"}}, r"'model.image_size' must be an integer, got 'big'"),
    ({"model": {"seeds": [0, "one"]}}, r"'model.seeds' must be an integer"),
    ({"execution": {"workers": True}}, r"'execution.workers' must be an integer"),
    ({"shift": {"modes": ["domain", "sideways"]}}, r"'shift.modes' must be one of"),
    ({"methods": {"patchcor": {}}}, r"unknown method 'methods.patchcor' \(did you mean 'patchcore'\?\)"),
    ({"efficiency": {"categories": ["walnut"]}}, r"'efficiency.categories' must be a subset"),
    ({"model": {"backbone": "vgg"}}, r"'model.backbone' must be one of"),
])
def test_bad_keys_and_types_are_named(tmp_path, patch, message):
    path = write(tmp_path, config.deep_merge(MINIMAL, patch))
    with pytest.raises(ProfileError, match=message) as info:
        config.load(path)
    assert str(path) in str(info.value)


def test_a_missing_required_key_is_named(tmp_path):
    raw = {"data": {"dataset": "synthetic", "categories": ["carpet"]}}
    with pytest.raises(ProfileError, match=r"missing required key 'data.root'"):
        config.load(write(tmp_path, raw))


def test_overrides_nested_or_dotted_and_methods_can_be_dropped(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = config.load(path, {"methods.patchcore.k": 3, "model": {"seeds": [4]}, "methods.padim": None})
    assert cfg.methods["patchcore"].k == 3 and cfg.model.seeds == (4,) and set(cfg.methods) == {"patchcore"}
    with pytest.raises(ProfileError, match="overrides"):
        config.load(path, {"methods.patchcore.kk": 3})


def test_run_folder_is_named_by_the_hash_of_what_changes_results(tmp_path):
    path = write(tmp_path, config.deep_merge(MINIMAL, {"output": {"runs_dir": str(tmp_path / "runs")}}))
    base = Run.open(path)
    assert base.dir == tmp_path / "runs" / f"p-{base.hash}"
    assert yaml.safe_load((base.dir / "config.yaml").read_text())["data"]["root"] == "data/x"
    same = Run.open(path, {"execution.workers": 7})
    assert same.dir == base.dir and not same.overridden, "how a run executes never changes its identity"
    other = Run.open(path, {"methods.patchcore.coreset_ratio": 0.5})
    assert other.dir != base.dir and other.overridden and other.publish_dir is None


def test_command_line_reports_a_bad_profile_in_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, config.deep_merge(MINIMAL, {"model": {"image_sise": 3}}))
    for module in ("helpers.config", "helpers.study"):
        done = subprocess.run([sys.executable, "-m", module, "--profile", str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "model.image_sise" in lines[0] and "model.image_size" in lines[0], done.stderr

"""The mvtec-rehearsal profile: the mvtec profile's settings on generated data of MVTec AD's shape, with a stand-in
backbone that says so; configuration fields added for it leave every existing run's name as it was."""
import pytest
import yaml

from helpers import backbones, config
from helpers.config import ProfileError


@pytest.fixture
def weights(monkeypatch):
    """Pretend the named backbones' weights are (or are not) on this machine."""
    here: set[str] = {"efficientnet_lite0"}
    monkeypatch.setattr(backbones, "is_available", lambda name: name in here)
    return here


def test_the_rehearsal_runs_the_mvtec_settings(weights):
    weights.add("wide_resnet50_2")
    mvtec, rehearsal = config.to_dict(config.load("mvtec")), config.to_dict(config.load("mvtec-rehearsal"))
    for section in ("methods", "sweep", "thresholds", "unified", "efficiency", "execution"):
        assert rehearsal[section] == mvtec[section], section
    assert {k: v for k, v in rehearsal["model"].items() if k != "stand_in"} == \
           {k: v for k, v in mvtec["model"].items() if k != "stand_in"}
    assert {k: v for k, v in rehearsal["shift"].items() if k != "root"} == \
           {k: v for k, v in mvtec["shift"].items() if k != "root"}
    same_data = ("categories", "draws", "calib_size", "val_fraction", "n_train")
    assert {k: rehearsal["data"][k] for k in same_data} == {k: mvtec["data"][k] for k in same_data}


def test_the_rehearsal_data_has_mvtec_ads_shape():
    from data_prep import synthetic

    data = config.load("mvtec-rehearsal").data
    assert data.synthetic.size == synthetic.MVTEC_AD_SIZE
    for category in data.categories:
        shape = data.synthetic.per_category[category]
        known = synthetic.MVTEC_AD[category]
        assert (shape.n_train, dict(shape.test)) == (known["train"], known["test"])
        assert shape.greyscale == (category in synthetic.MVTEC_AD_GREYSCALE)


def test_without_its_weights_the_stand_in_runs_and_the_configuration_says_so(weights):
    cfg = config.load("mvtec-rehearsal")
    assert (cfg.model.backbone, cfg.model.stands_in_for) == ("efficientnet_lite0", "wide_resnet50_2")
    assert cfg.methods["padim"].n_features == 176 and cfg.sweep.grids["padim"]["n_features"] == (50, 100, 176)
    assert cfg.sweep.grids["padim"]["image_size"] == (224, 256, 320)  # the stand-in changes only what it names
    assert "stands_in_for: wide_resnet50_2" in config.dump(cfg)
    # The caller's overrides still win over the stand-in's values; the run is another one than with the weights.
    assert config.load("mvtec-rehearsal", {"methods.padim.n_features": 50}).methods["padim"].n_features == 50
    weights.add("wide_resnet50_2")
    real = config.load("mvtec-rehearsal")
    assert (real.model.backbone, real.model.stands_in_for, real.methods["padim"].n_features) == \
           ("wide_resnet50_2", None, 550)
    assert config.run_hash(real) != config.run_hash(cfg)


def test_the_report_setup_names_the_stand_in(weights, tmp_path):
    from helpers import paper
    from helpers.paths import Run

    run = Run("mvtec-rehearsal", config.load("mvtec-rehearsal"))
    text = "\n".join(paper.setup(run, {}, {}))
    assert "stand-in" in text and "wide_resnet50_2" in text


def _profile(tmp_path, **sections):
    raw = {"data": {"dataset": "synthetic", "root": "x", "categories": ["hazelnut"]}, **sections}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_profile_cannot_claim_a_stand_in_itself(tmp_path):
    with pytest.raises(ProfileError, match="model.stands_in_for"):
        config.load(_profile(tmp_path, model={"stands_in_for": "wide_resnet50_2"}))
    with pytest.raises(ProfileError, match="model.stand_in.*must name the backbone"):
        config.load(_profile(tmp_path, model={"stand_in": {"methods.padim.n_features": 10}}))


def test_a_category_shape_the_generator_cannot_draw_is_refused(tmp_path):
    shape = {"n_train": 3, "test": {"good": 2, "scratch": 1}}
    with pytest.raises(ProfileError, match=r"data.synthetic.per_category.hazelnut.test.*scratch"):
        config.load(_profile(tmp_path, data={"dataset": "synthetic", "root": "x", "categories": ["hazelnut"],
                                             "synthetic": {"per_category": {"hazelnut": shape}}}))
    shape = {"n_train": 3, "test": {"crack": 2}}
    with pytest.raises(ProfileError, match="must hold good images"):
        config.load(_profile(tmp_path, data={"dataset": "synthetic", "root": "x", "categories": ["hazelnut"],
                                             "synthetic": {"per_category": {"hazelnut": shape}}}))


def test_fields_added_later_name_no_new_run_until_they_are_set(tmp_path):
    """The run's hash is that of the configuration without them, as before they existed."""
    import hashlib
    import json

    cfg = config.load(_profile(tmp_path))
    body = config.to_dict(cfg)
    for section, key in (("model", "stand_in"), ("model", "stands_in_for")):
        body[section].pop(key)
    body["data"]["synthetic"].pop("per_category")
    unhashed = {k: v for k, v in body.items() if k not in config.UNHASHED}
    assert config.run_hash(cfg) == hashlib.sha256(json.dumps(unhashed, sort_keys=True).encode()).hexdigest()[:8]
    shaped = config.load(_profile(tmp_path, data={"dataset": "synthetic", "root": "x", "categories": ["hazelnut"],
                                                  "synthetic": {"per_category": {"hazelnut": {
                                                      "n_train": 3, "test": {"good": 2, "cut": 1}}}}}))
    assert config.run_hash(shaped) != config.run_hash(cfg)

# The two entry points are `make study` and `make test`; both set up .venv first when it is missing or stale.
PROFILE ?= default
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup study test lint lab bench notebooks-html clean-runs

setup: $(STAMP)

# Re-installs whenever requirements.txt or pyproject.toml is newer than the last install.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The repository root on the venv's path, so notebooks import helpers from any folder (no build step).
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'anomaly_shift_study.pth').write_text('$(CURDIR)\n')"
	touch $(STAMP)

study: setup
	$(PY) -m helpers.study --profile $(PROFILE)

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check --no-cache helpers data_prep tests notebooks

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# The executed notebooks of the profile's run as HTML pages in its figures folder (notebooks/NN_name.html, published
# to figures/notebooks/ by the runner), then checked: every local link resolves, and in headless Chromium, where
# installed, every image loads.
notebooks-html: setup
	$(PY) -m helpers.render_notebooks --profile $(PROFILE)

# Needs the default data (make study generates it under data/synthetic/seed=0).
bench: setup
	$(PY) -m helpers.bench patchcore --root data/synthetic/seed=0 --category hazelnut --n-train 100 --n-test 50

# Removes this profile's runs, and the staging folders and temporary files a killed run can leave behind.
clean-runs:
	rm -rf runs/$(PROFILE)-*
	find data cache -name '.synthetic-staging-*' -prune -exec rm -rf {} + 2>/dev/null || true
	find cache -name '.*.tmp' -delete 2>/dev/null || true

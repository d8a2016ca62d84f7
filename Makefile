# nucseg: `make up` runs the service locally, `make test` runs every check CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLES := .cache/samples/cmu_small_region.svs
PACKAGES := api core worker cli model training
SRC := $(PACKAGES) client benchmarks scripts tests

.PHONY: venv samples up predict-sample test lint typecheck pytest chromium bench clean web-vendor \
        compose-base compose-build compose-up compose-down compose-test

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e ./client
	touch $@

samples: $(SAMPLES)

$(SAMPLES): scripts/fetch_samples.py | $(STAMP)
	$(PY) scripts/fetch_samples.py

up: venv samples
	$(VENV)/bin/nucseg up

predict-sample: venv samples
	$(VENV)/bin/nucseg predict $(SAMPLES) --out .data/predict-sample

lint: venv
	$(VENV)/bin/ruff check $(SRC)

typecheck: venv
	$(VENV)/bin/mypy $(PACKAGES) client/nucseg_client

pytest: venv samples
	$(PY) -m pytest -q

test: chromium lint typecheck pytest

# The browser tests drive Debian's Chromium (no browser download): install it once if missing and
# this user may (root or password-less sudo), otherwise say how and stop before any test runs.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "$(CHROMIUM) is missing (browser tests): run 'sudo apt-get install -y chromium' once" >&2; exit 1; fi; \
	  echo "installing Chromium for the browser tests (apt-get)"; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

bench: venv samples
	$(PY) -m benchmarks.engine

# OpenSeadragon (pinned in web/package.json + web/package-lock.json) into the committed static folder.
OSD_BUILD := web/node_modules/openseadragon/build/openseadragon
OSD_VENDOR := api/static/vendor/openseadragon

web-vendor:
	cd web && npm ci --no-audit --no-fund
	rm -rf $(OSD_VENDOR)
	mkdir -p $(OSD_VENDOR)
	cp $(OSD_BUILD)/openseadragon.min.js $(OSD_VENDOR)/
	cp -r $(OSD_BUILD)/images $(OSD_VENDOR)/images
	cp web/node_modules/openseadragon/LICENSE.txt $(OSD_VENDOR)/

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache

# ---------------------------------------------------------------- Docker (opt-in; not part of `make test`)
# COMPOSE_FILE (read by Compose itself) adds compose.local.yml, which builds on local base images
# (scripts/docker_base.sh) and takes torch from the package registry's index. Where Docker Hub and
# PyTorch's CPU index are reachable: `make compose-up COMPOSE_FILE=docker-compose.yml`.
export COMPOSE_FILE ?= docker-compose.yml:compose.local.yml
export COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_PROJECT ?= nucseg

compose-base:
	@case "$(COMPOSE_FILE)" in *compose.local.yml*) scripts/docker_base.sh ;; esac

compose-build: compose-base
	$(COMPOSE) build s3 api worker

compose-up: compose-build
	@test -f "$${NUCSEG_TENANTS:-config/tenants.json}" || { echo "no tenants file: put 'nucseg keys new TENANT' entries in config/tenants.json (see config/tenants.example.json)" >&2; exit 2; }
	mkdir -p "$${NUCSEG_SLIDES:-slides}"
	$(COMPOSE) -p $(COMPOSE_PROJECT) up -d --no-build

compose-down:
	$(COMPOSE) -p $(COMPOSE_PROJECT) down

compose-test: venv samples chromium compose-build
	$(PY) -m pytest --compose -q tests/compose

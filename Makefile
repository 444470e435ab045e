# The two commands: `make run` and `make test`. Everything else is what they call.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PY_COLORS := 0
export ANSIBLE_FORCE_COLOR := 0

.PHONY: run test bootstrap lint unit molecule molecule-tailscale bench clean-sim

## run: bring up the simulated GPU host and app server, converge them with site.yml, run a job
run: bootstrap
	scripts/run-demo.sh

## test: every check: linters, unit and integration tests, molecule scenarios
test: bootstrap lint unit molecule

bootstrap:
	scripts/bootstrap.sh

lint:
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit:
	$(BIN)/pytest -q tests comfyui-worker/tests

molecule:
	$(BIN)/molecule test -s default
	$(BIN)/molecule test -s fleet
	$(BIN)/molecule test -s tailscale
	$(BIN)/molecule test -s ubuntu

bench: bootstrap
	scripts/bench-converge.sh
	scripts/bench-image.sh
	$(BIN)/python comfyui-worker/bench/bench_worker.py
	$(BIN)/python comfyui-worker/bench/bench_files.py

## clean-sim: remove the simulated hosts (their disks' contents are kept)
clean-sim:
	$(BIN)/molecule destroy -s default

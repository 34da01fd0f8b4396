# Two commands do all the set-up on a fresh Debian bookworm machine, as root:
#   make demo   installs what is missing, then reproduces a wrong-pod connection in a lab
#   make test   installs what is missing, then runs every test tier (unit, kernel, vm)
SHELL := /bin/bash
VENV := .venv
PYTEST := $(VENV)/bin/pytest

.PHONY: demo test deps test-deps unit kernel vm lint bench clean

deps:
	@scripts/install-deps.sh base

test-deps:
	@scripts/install-deps.sh test
	@scripts/build-kube.sh kube-apiserver kube-proxy >/dev/null
	@scripts/vm-setup.sh

demo: deps
	$(VENV)/bin/cttrace demo

test: test-deps lint
	$(PYTEST) -q tests/unit tests/kernel tests/test_vm_tier.py

unit: deps
	$(PYTEST) -q tests/unit

kernel: test-deps
	$(PYTEST) -q tests/kernel

vm: test-deps
	$(PYTEST) -q tests/test_vm_tier.py

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: test-deps
	$(VENV)/bin/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

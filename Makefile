# One entry point for a fresh machine: `make run` (service / demo) and `make test` (all checks).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU wheel that lies on this machine's disk; on a machine with a
# CUDA GPU the same pin from PyPI is the CUDA build (see Dockerfile).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= core,api,dev

.PHONY: install run test test-slow lint typecheck clean compose-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The embedded service: API + one worker, SQLite, local files, the built-in tiny model, CPU.
# It listens on this machine only; `make run HOST=0.0.0.0` listens on every interface, so that
# other machines reach it at http://<this machine's address>:$(PORT) (docs/deployment.md).
# ARGS: the launcher's other options, e.g. make run ARGS=--new-key
HOST ?= 127.0.0.1
PORT ?= 8000
run: install
	$(BIN)/python -m worker.embedded --host $(HOST) --port $(PORT) $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Passive OpenMP waits: tests run torch in several processes at once (pytest, workers), and
# spinning OpenMP threads on 2 cores slowed them tenfold or more.
# `test` leaves out the tests marked slow (about 20 minutes on 2 cores: real-process faults,
# load, Prometheus, the benchmarks' runs); `test-slow` runs just those. CI runs both.
test: lint typecheck
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -m "not slow"

test-slow: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -m slow

# docker-compose.yml started for real with podman on this machine (CPU, no registry): stand-in
# base images, the project's images, a fine-tune, a generation, a worker stopped mid-job
# (deploy/compose-test/run.sh; needs root, podman, runc and debootstrap).
compose-test: install
	PYTHON=$(abspath $(BIN))/python deploy/compose-test/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

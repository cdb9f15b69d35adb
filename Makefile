# ICH Watch — the two commands of a fresh machine are `make run` and `make test`.
# Each does all of its own set-up (venv, Python dependencies, system packages).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# TensorFlow build: `make install TF=gpu` installs tensorflow[and-cuda] instead of tensorflow-cpu.
TF     ?= cpu
EXTRAS := $(TF),dev
STAMP  := $(VENV)/.installed-$(TF)
PYTEST_ARGS ?=

.PHONY: install system-deps test run bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

system-deps:
	@scripts/system-deps

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: install system-deps
	@echo "ICH Watch: the listener and workers are not built yet (issues 4-6)." >&2
	@echo "Today you can generate phantom data: $(BIN)/python -m training.synthetic --out data/synthetic --studies 10 --seed 1" >&2
	@exit 1

bench: install system-deps
	$(BIN)/python bench/bench_imaging.py
	$(BIN)/python bench/bench_synthetic.py

docs: install
	$(BIN)/python scripts/update-readme

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

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
# The suite runs in two pytest-xdist processes, one test file each at a time (module fixtures
# are built once): most tests wait on Redis, sockets and child processes, so two processes on
# 2 cores take 8 minutes where one took 13-19. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: install system-deps test soak run demo bench bench-alerts docs clean

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
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Long load and fault runs (issue 7): prints the figures they measure.
soak: install system-deps
	$(BIN)/python -m pytest -m soak -s $(PYTEST_ARGS)

run: install system-deps
	@scripts/run

# Sends one synthetic positive and one negative study to the node `make run` started;
# ICH_DEMO_PACS=AET@host:port stores them in that PACS first, as a modality would.
DEMO_SEND = $(BIN)/python -m dicom_listener.send --synthetic-studies 1 --seed 3 --port $${ICH_DICOM_PORT:-11112} --called-aet $${ICH_AE_TITLE:-ICHWATCH} $${ICH_DEMO_PACS:+--also $$ICH_DEMO_PACS}
demo: install
	$(DEMO_SEND) --positive
	$(DEMO_SEND) --negative

bench: install system-deps
	$(BIN)/python bench/bench_imaging.py
	$(BIN)/python bench/bench_synthetic.py
	$(BIN)/python bench/bench_listener.py
	$(BIN)/python bench/bench_worker.py

# Study alerts end to end on unseen phantoms with the model in service (docs/alerts.md's table).
bench-alerts: install system-deps
	$(BIN)/python bench/bench_study_alerts.py --model $${ICH_MODEL_DIR:-models/current} --studies 60 --seed 4242

docs: install
	$(BIN)/python scripts/update-readme

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

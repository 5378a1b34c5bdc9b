# Developer shortcuts. PYTHON and RUFF default to the project venv made by scripts/setup.sh;
# PERF_ARGS passes options to benchmarks/perf.py, e.g. make perf PERF_ARGS="--sizes 100m --repeat 3".
PYTHON ?= .venv/bin/python
RUFF ?= .venv/bin/ruff
PERF_ARGS ?=

.PHONY: perf perf-quick test lint

# neuromerge merge vs mergekit: sizes 100m,300m,1b x 3 experts and 100m x 2,4,8 experts; writes
# docs/performance.{md,png,json}. Long (about an hour or more on 2 cores): run it on a quiet machine.
perf:
	$(PYTHON) benchmarks/perf.py $(PERF_ARGS)

# Smoke test: tiny models, 2 experts, both tools, plus the agreement check; report in the cache.
perf-quick:
	$(PYTHON) benchmarks/perf.py --quick --check $(PERF_ARGS)

test:
	$(PYTHON) -m pytest -q

lint:
	$(RUFF) check src tests scripts benchmarks

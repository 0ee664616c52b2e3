# Two commands on a fresh machine (the README's quick start): each first installs into the active
# Python whatever is missing (torch + torchvision, Detectron2, afigan with its test and vis extras;
# see scripts/setup_env.py for TORCH_SPEC, D2_SRC, D2_GIT, PIP) and does nothing when all is there.
#
#   make quickstart    the toy chain on CPU: stage 0 -> 1 -> 2 -> 3 -> COCO evaluation
#   make test          the test suite
#   make setup         only the installation

# The active environment's interpreter (python3 where there is no `python`); `make PYTHON=...` overrides.
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)
# PIPELINE_OPTS: trailing KEY VALUE overrides for every stage of the quick start (the README test cuts
# the iterations with it).
QUICKSTART = $(PYTHON) tools/pipeline.py --config-dir configs/toy/quickstart --output-dir output/quickstart --make-toy-data $(PIPELINE_OPTS)
TEST = $(PYTHON) -m pytest -q tests

.PHONY: setup quickstart test

setup:
	$(PYTHON) scripts/setup_env.py

quickstart: setup
	$(QUICKSTART)

test: setup
	$(TEST)

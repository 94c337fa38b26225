SHELL := /bin/bash
# fcot-vl task runner. `make demo` and `make test` create .venv and install everything they need.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
# torch 2.13.0 resolves to the local CPU wheel on these machines; an unpinned torch pulls several GB.
DEPS    := torch==2.13.0 "triton>=3.0" "transformers>=4.52" "pybind11>=2.12" numpy pytest pytest-benchmark hypothesis ninja setuptools wheel \
           accelerate peft safetensors pillow tqdm matplotlib pyyaml
SOURCES := $(wildcard csrc/*) setup.py CMakeLists.txt pyproject.toml

.PHONY: env install triton-gpu demo test test-fast test-seeds test-tf4 bench bench-quick bench-report bench-pytest clean

env: $(VENV)/.deps
$(VENV)/.deps: Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	touch $@

# Editable install; builds fcot_kernels._C with nvcc (FCOT_REQUIRE_CUDA=1 makes a failed build fatal).
install: build/.installed
build/.installed: $(VENV)/.deps $(SOURCES)
	mkdir -p build
	set -o pipefail; $(PIP) install -v --no-deps --no-build-isolation -e . 2>&1 | tee build/install.log \
		| grep -E '^ *fcot-vl:|Successfully installed' || { tail -40 build/install.log; exit 1; }
	touch $@

# The GPU machine's Triton (../shared/GPU.md), side by side in an ignored folder, for the
# compiled-code gate (tests/test_triton_sm90_compile.py runs it under both Tritons). Installed
# once (again only when the Makefile changes, like the venv): one wheel, ~640 MB unpacked.
GPU_TRITON := 3.6
triton-gpu: $(VENV)/triton-gpu/.installed
$(VENV)/triton-gpu/.installed: $(VENV)/.deps
	rm -rf $(VENV)/triton-gpu
	$(PIP) install -q --no-deps --target $(VENV)/triton-gpu "triton==$(GPU_TRITON).*"
	echo "$(GPU_TRITON)" > $@

demo: install
	$(PYTHON) -m fcot demo --overwrite

# Everything (CI). test-fast leaves out the cases marked slow (real model shapes, fuzzing, multi-process
# and end-to-end runs): the subset a developer runs after each change, in minutes.
test: install triton-gpu
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

# The fast subset under several seeds (FCOT_TEST_SEED draws the random inputs, the fuzzed ones too,
# tests/conftest.py): a tolerance that holds only for some inputs, or only on one CPU, fails here. Run it
# before stopping work. Narrow it with TESTS=path/or/node::id, change the seeds with SEEDS="...".
SEEDS ?= 11 22 33 44 55
TESTS ?=
test-seeds: install
	@set -e; for seed in $(SEEDS); do \
		echo "== FCOT_TEST_SEED=$$seed"; \
		FCOT_TEST_SEED=$$seed $(PYTHON) -m pytest -q -m "not slow" $(TESTS); \
	done

# The remote-code family on a transformers 4.x: OpenGVLab's InternVL2 code runs unmodified only
# up to 4.51 (README, "Versions"). transformers 4.51.3 and the two packages whose 4.51-compatible
# versions differ from the venv's (+ requests, which huggingface-hub < 1.0 needs) go into an ignored folder
# that shadows them through PYTHONPATH.
TF4_DIR   := build/transformers-4.51
TF4_TESTS := tests/fcot/models/test_family.py tests/fcot/models/test_autoload.py tests/fcot/eval/test_run_remote.py \
             tests/fcot/models/test_internvl_chat.py
test-tf4: install
	test -f $(TF4_DIR)/.installed || { $(PIP) install -q --no-deps --target $(TF4_DIR) "transformers==4.51.3" \
		"tokenizers>=0.21,<0.22" "huggingface-hub>=0.30,<1.0" requests charset-normalizer urllib3 certifi && touch $(TF4_DIR)/.installed; }
	PYTHONPATH=$(TF4_DIR) $(PYTHON) -m pytest -q -p no:cacheprovider $(TF4_TESTS)

# The performance report: every benchmark into bench/results/<device>/<date>-<commit>/, then the
# plots and docs/performance.md (commit both). bench-quick is the smoke run (CPU shapes).
bench: install
	$(PYTHON) -m fcot bench --report

bench-quick: install
	$(PYTHON) -m fcot bench --quick --report

bench-report: install
	$(PYTHON) -m fcot bench report

bench-pytest: install
	$(PYTHON) -m pytest bench/ --benchmark-only

clean:
	rm -rf build $(VENV) *.egg-info fcot_kernels/_C*.so

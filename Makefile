# Two commands a newcomer needs: `make serve` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
STAMP := $(VENV)/.installed

.PHONY: install serve test lint docs bench-report bench bench-peers bench-load bench-soak bench-scale bench-models experts router eval fetch-paper-model clean

$(STAMP): pyproject.toml scripts/install.sh scripts/constraints.txt
	EDITABLE=1 scripts/install.sh $(VENV) dev
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/xlora-serve --config $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The docs site (mkdocs.yml, docs/) on http://127.0.0.1:8001, rebuilt on every change; offline.
# `make test` builds it with --strict (tests/test_docs.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

bench: $(STAMP)
	$(PY) -m bench.generation --threads 1
	$(PY) -m bench.structured --threads 1

# The docs' benchmark plots (docs/bench-*.png): quick runs of bench.load and bench.generation (a few minutes),
# their JSON in build/bench/; a kind not run is drawn from the recorded runs in bench/results/.
# `python -m bench.report --plot-only` redraws from the JSON; `--peers` adds bench.peers (compiles for minutes).
bench-report: $(STAMP)
	$(PY) -m bench.report

# Per-token speed against mistral.rs's X-LoRA on the embedded default, as xlora-serve runs it by default (dtype,
# threads, the compiled decode step; docs/benchmarks.md, "Against mistral.rs").
# ../shared/peers/mistralrs/setup.sh builds mistral.rs' venv and model into build/peers once.
bench-peers: $(STAMP)
	[ -x build/peers/venv-mistralrs/bin/python ] || ../shared/peers/mistralrs/setup.sh build/peers
	$(PY) -m bench.peers

# 8 clients against one at a time, both servers decoding as the default does: the compiled step (built first
# into the cache, minutes the first time) (docs/benchmarks.md#serving-under-load).
bench-load: $(STAMP)
	$(PY) -m bench.load --config $(CONFIG) --concurrency 1,4,8,16 --requests 4 --repeat 3 --max-new-tokens 32 --torch-threads 1 --compiled

# The plain server against Ray Serve with 1 and 2 replicas (1 torch thread each), 8 clients (docs/scaling-out.md).
bench-scale: $(STAMP)
	$(PY) -m bench.scale --config $(CONFIG) --clients 8 --requests 4 --max-new-tokens 32

# Rows of different models (the X-LoRA model, its experts alone, a mixture, the base) in one batch against the
# X-LoRA model's rows alone, in-process (docs/models.md).
bench-models: $(STAMP)
	$(PY) -m bench.models --threads 1 --rows 8 --new-tokens 32

bench-soak: $(STAMP)
	$(PY) -m bench.soak --config $(CONFIG) --requests 1000 --clients 8 --max-new-tokens 8 --torch-threads 1

# The three experts of the embedded default (fixed seeds; about 6 hours with 1 torch thread, sorting 5 of
# them; not run in CI).
experts: $(STAMP)
	scripts/make_experts.sh

# The router of the embedded default (experts frozen; fixed seed; about 16 minutes with 1 torch thread).
# The system turn every chat starts with goes to the json expert (docs/default-model.md, "The shared system prompt").
router: $(STAMP)
	$(VENV)/bin/xlora-train --threads 1 classifier --out checkpoints/default --steps 150 --batch-size 8 --lr 2e-3 \
		--seed 0 --prefix-expert json

eval: $(STAMP)
	$(VENV)/bin/xlora-eval --checkpoint checkpoints/default --threads 2

# The paper's model (docs/paper-model.md) into the Hugging Face cache (HF_HOME, default ~/.cache/huggingface;
# about 15 GB), so that a machine or an image serves configs/gpu-xlora-paper.yaml offline (HF_HUB_OFFLINE=1).
fetch-paper-model: $(STAMP)
	$(VENV)/bin/xlora-serve --config configs/gpu-xlora-paper.yaml --download-only

clean:
	rm -rf $(VENV) .pytest_cache

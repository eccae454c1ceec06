# Two commands a newcomer needs: `make serve` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench bench-load experts eval clean

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

bench: $(STAMP)
	$(PY) -m bench.generation

bench-load: $(STAMP)
	$(PY) -m bench.load --config $(CONFIG)

experts: $(STAMP)
	scripts/make_experts.sh

eval: $(STAMP)
	$(VENV)/bin/xlora-eval --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache

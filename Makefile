# One command installs and runs the main job (`make demo`), one installs and runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PHOTOS ?= ../shared/data/fashion/images
STORE ?= demo.h5
PYTEST_ARGS ?=
QUERY ?= red floral summer dress

.PHONY: install demo test lint bench clean reliability

$(BIN)/hsl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/hsl

install: $(BIN)/hsl

demo: install
	$(BIN)/hsl extract $(PHOTOS) --store $(STORE)
	$(BIN)/hsl query "$(QUERY)" --store $(STORE) --top-k 5

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/extract.py

clean:
	rm -rf $(VENV) *.egg-info demo.h5

reliability: install  # regenerates docs/reliability.md from the suite's own record
	$(BIN)/python -m pytest -q tests/test_reliability.py tests/test_kills.py --reliability-report docs/reliability.md

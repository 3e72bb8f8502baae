# One command installs and runs the main job (`make demo`), one installs and runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo runs the README's main job on the shared catalog's manifest (titles + attributes), so every
# later README command (train, eval, --where, --html, serve) works on its store, fashion.h5.
# PHOTOS=DIR (or a manifest) gets a store of its own named after it: PHOTOS=~/shop/pics -> demo-pics.h5.
FASHION := ../shared/data/fashion/products.csv
PHOTOS ?= $(FASHION)
ifeq ($(PHOTOS),$(FASHION))
STORE ?= fashion.h5
EXTRACT_ARGS ?= --text-column productDisplayName --image-template 'images/{id}.jpg'
else
STORE ?= demo-$(basename $(notdir $(patsubst %/,%,$(PHOTOS)))).h5
EXTRACT_ARGS ?=
endif
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
	$(BIN)/hsl extract $(PHOTOS) --store $(STORE) $(EXTRACT_ARGS)
	$(BIN)/hsl query "$(QUERY)" --store $(STORE) --top-k 5

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/extract.py

clean:  # the venv and the demo's stores with their search indexes (demo.h5: the name older versions used)
	rm -rf $(VENV) *.egg-info fashion.h5 fashion.h5.index demo.h5 demo.h5.index demo-*.h5 demo-*.h5.index

reliability: install  # regenerates docs/reliability.md from the suite's own record
	$(BIN)/python -m pytest -q tests/test_reliability.py tests/test_kills.py --reliability-report docs/reliability.md

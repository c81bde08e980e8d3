# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
PYTHON ?= python3
DEMO_DIR ?= demo

.PHONY: test demo bench clean

.venv: setup.cfg pyproject.toml
	$(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch .venv

test: .venv
	$(PY) -m pytest tests -x

demo: .venv
	$(PY) -m caption.demo --out $(DEMO_DIR)

bench: .venv
	$(PY) -m bench.store
	$(PY) -m bench.gil
	$(PY) -m bench.featurize
	$(PY) -m bench.train
	$(PY) -m bench.train_e2e
	$(PY) -m bench.decode
	$(PY) -m bench.decode --coco --images 100 --one_by_one 5

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

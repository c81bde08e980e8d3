# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
PYTHON ?= python3
DEMO_DIR ?= demo

.PHONY: test demo bench clean browser

.venv: setup.cfg pyproject.toml
	$(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,app]'
	touch .venv

# The page's browser test drives Debian's chromium through chromium-driver (installed here when
# root may; elsewhere that one test is skipped, saying why). Nothing downloads a browser build.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } || \
	  echo "chromium/chromium-driver not installed: the browser test will be skipped"; }

test: .venv browser
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
	$(PY) -m bench.stream
	$(PY) -m bench.index

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

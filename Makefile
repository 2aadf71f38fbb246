# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python

.venv/installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -e '.[test]'
	touch .venv/installed

.PHONY: demo test bench
demo: .venv/installed
	.venv/bin/featstore run jobs/demo.toml

test: .venv/installed
	$(PY) -m pytest -q tests

bench: .venv/installed
	$(PY) bench/encode_bench.py
	$(PY) bench/probe_bench.py

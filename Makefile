# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both install first (idempotent: a second run only checks).
PY := .venv/bin/python

.PHONY: install demo test test-fast stack-up stack-down clean

install:
	bash infra/install.sh

demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest

test-fast: install   # unit tests only, no services
	$(PY) -m pytest -m "not integration"

stack-up: install
	$(PY) -m infra.stack up

stack-down:
	$(PY) -m infra.stack down

clean:
	rm -rf .venv .stack .pytest_cache

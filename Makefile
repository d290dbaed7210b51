# Every target uses the virtual environment that scripts/setup.sh creates.
PY := .venv/bin/python

protos:
	$(PY) tools/gen_protos.py

test:
	$(PY) -m pytest

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

demo:
	.venv/bin/ferry demo

bench:
	$(PY) -m bench

bench-transfer:
	$(PY) -m bench.transfer

bench-backup:
	$(PY) -m bench.backup

bench-snapshots:
	$(PY) -m bench.snapshots

bench-mobility:
	$(PY) -m bench.mobility

.PHONY: protos test lint demo bench bench-transfer bench-backup bench-snapshots bench-mobility

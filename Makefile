protos:
	python3 tools/gen_protos.py

test:
	python3 -m pytest

lint:
	ruff check .
	ruff format --check .
	mypy

demo:
	ferry demo

bench:
	python3 -m bench

.PHONY: protos test lint demo bench

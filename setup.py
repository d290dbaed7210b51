"""Build hook: generate csi_driver/gen from proto/ whenever the package is built.

pyproject.toml holds all metadata; this file only makes ``pip install .`` and
``pip install -e .`` run tools/gen_protos.py first, so generated code is never
committed and never stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent


def _generate() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from gen_protos import generate
    finally:
        sys.path.pop(0)
    generate(ROOT)


class BuildWithProtos(build_py):
    def run(self) -> None:
        _generate()
        super().run()


class EditableWithProtos(editable_wheel):
    def run(self) -> None:
        _generate()
        super().run()


class DevelopWithProtos(develop):
    def run(self) -> None:
        _generate()
        super().run()


setup(
    cmdclass={
        "build_py": BuildWithProtos,
        "editable_wheel": EditableWithProtos,
        "develop": DevelopWithProtos,
    }
)

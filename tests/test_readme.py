"""README's quick start is a contract: CI runs its test command, and its demo works.

The two commands a newcomer types are read out of README.md, so a change to
either that is not made in .ci/run (or that breaks the demo) fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.node.conftest import loops_gone_under, requires_root

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_has_two_commands_that_set_up_first() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert all(c.startswith("bash scripts/setup.sh && ") for c in commands)
    assert "ferry demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_exactly() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert steps == [quick_start_commands()[1]]


def test_setup_never_pip_installs_into_the_system_python() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    pip_lines = [line for line in setup.splitlines() if "pip install" in line]
    assert pip_lines
    assert all(line.lstrip().startswith('"$venv/bin/python" -m pip') for line in pip_lines)


@requires_root
@pytest.mark.slow
def test_demo_moves_a_volume_between_nodes_and_fails_it_over(tmp_path: Path) -> None:
    demo = quick_start_commands()[0].split(" && ", 1)[1].split()
    assert demo[-1] == "demo"
    done = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=280,  # a ceiling under pytest's 300 s: the demo waits longer when loaded
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"attach \+ stage \+ publish in [\d.]+ s; the final sync shipped", done.stdout)
    assert re.search(r"verified: all \d+ acknowledged records identical on node-2", done.stdout)
    assert re.search(r"promoted node-\d \(epoch 3\); data-loss window", done.stdout)
    assert "the data survived the move and the node's loss" in done.stdout
    assert not (tmp_path / "demo").exists()
    # Nothing held by the kernel either: node-2, killed mid-capture, may have left
    # its filesystem frozen, which the teardown thaws before unmounting it.
    assert loops_gone_under(tmp_path) == []


@requires_root
@pytest.mark.slow
def test_local_demo_walks_a_volume_through_its_life(tmp_path: Path) -> None:
    local = [sys.executable, "-m", "csi_driver.cli", "demo", "--local"]
    done = subprocess.run(
        [*local, "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the data survived" in done.stdout
    assert not (tmp_path / "demo").exists()

"""``ferry sandbox`` on the command line: refusals that need no host, and the table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver.cli import main
from csi_driver.sandbox.commands import format_table
from csi_driver.sandbox.harness import MemberState, MemberStatus


def test_the_table_lines_up_and_marks_missing_cells() -> None:
    rows = [
        MemberStatus("etcd", "ab-control", "10.1.0.2", 41, None, MemberState.ALIVE),
        MemberStatus(
            "node-12", "ab-node-12", "10.1.0.22", None, Path("/s/n.sock"), MemberState.DEAD
        ),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["NODE", "NAMESPACE", "ADDRESS", "PID", "SOCKET", "STATE"]
    assert lines[1].split() == ["etcd", "ab-control", "10.1.0.2", "41", "-", "alive"]
    assert lines[2].split() == ["node-12", "ab-node-12", "10.1.0.22", "-", "/s/n.sock", "dead"]
    assert lines[0].index("STATE") == lines[1].index("alive") == lines[2].index("dead")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--nodes", "0"], "--nodes must be between"),
        (["up", "--prefix", "Bad-Prefix"], "prefix 'Bad-Prefix'"),
        (["status"], "no sandbox in"),
        (["down"], "pass --prefix"),
        (["kill", "node-1"], "ferry sandbox up"),
    ],
)
def test_refusals_exit_1_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["sandbox", *argv, "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ferry sandbox {argv[0]}: ")
    assert message in err
    assert not (tmp_path / "sandbox.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="without root, the root check answers first")
def test_up_names_the_host_tools_it_misses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH holding none of them
    assert main(["sandbox", "up", "--dir", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "needs ip, nsenter, etcd, etcdctl" in err and "scripts/setup.sh" in err
    assert not (tmp_path / "s").exists()

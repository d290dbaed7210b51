from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from csi_driver import __version__
from csi_driver.cli import build_parser, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512Mi", 512 * 2**20),
        ("10Gi", 10 * 2**30),
        ("1G", 10**9),
        ("4096", 4096),
        ("2Ti", 2 * 2**40),
    ],
)
def test_sizes_use_kubernetes_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1Gi", "1.5Gi", "ten", "1Xi"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_node_defaults_follow_kubernetes_conventions() -> None:
    args = build_parser().parse_args(["node", "--node-id", "n1"])
    assert (args.node_id, str(args.pool), args.kubelet_dir) == ("n1", "/var/lib/ferry/pool", None)


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    done = ferry("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"ferry {__version__}")


def test_a_bad_endpoint_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    done = ferry(
        "all-in-one", "--endpoint", "nonsense", "--catalog", str(tmp_path / "c.db"),
        "--pool", str(tmp_path / "pool"), "--kubelet-dir", str(tmp_path),
        "--agent-endpoint", f"unix://{tmp_path}/agent.sock",
    )  # fmt: skip
    assert done.returncode == 1
    assert "neither unix:///path nor tcp://host:port" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "--log-format", "text", "node"],
        ["node", "--log-level=debug", "--log-format=text"],
        ["--log-format=text", "node", "--log-level", "debug"],
    ],
)
def test_logging_flags_go_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == ("debug", "text")


def test_logging_flags_default_to_info_json() -> None:
    args = build_parser().parse_args(["controller"])
    assert (args.log_level, args.log_format) == ("info", "json")

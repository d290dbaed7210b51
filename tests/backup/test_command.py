"""``ferry backup ...`` and ``ferry restore`` as an operator runs them: real processes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from csi_driver.backup.targets import S3Target
from csi_driver.cli import main
from tests.backup.conftest import CHUNK, child_env, mixed_image, s3_settings


def ferry(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``ferry ARGS`` as its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", *map(str, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def ferry_here(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``ferry ARGS`` through the same entry point, in this process (no start-up cost)."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main() configures logging its way
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_the_operator_cycle_on_a_directory(tmp_path: Path) -> None:
    key, target, image = tmp_path / "key", tmp_path / "target", tmp_path / "image"
    mixed_image(image)
    assert ferry("backup", "keygen", "--out", key).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = ferry("backup", "keygen", "--out", key)
    assert again.returncode == 1 and "never overwrites" in again.stderr
    common = ("--target", target, "--key-file", key)
    first = ferry(
        "backup", "create", *common, "--image", image, "--name", "db", "--chunk-size", str(CHUNK)
    )
    assert first.returncode == 0, first.stderr
    assert "64 new blocks" in first.stdout
    assert "backup " in first.stderr and "MiB/s" in first.stderr  # the progress bar
    second = ferry("backup", "create", *common, "--image", image, "--name", "db")
    assert "0 new blocks" in second.stdout
    listed = ferry("backup", "list", *common, "--json")
    docs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [d["volume_name"] for d in docs] == ["db", "db"]
    assert docs[0]["size_bytes"] == image.stat().st_size
    verify = ferry("backup", "verify", *common)
    assert verify.returncode == 0 and verify.stdout.count(": ok, 16 chunks") == 2
    restored = tmp_path / "restored"
    done = ferry("restore", docs[0]["backup_id"], *common, "--to", restored)
    assert done.returncode == 0, done.stderr
    assert restored.read_bytes() == image.read_bytes()
    pruned = ferry("backup", "prune", *common, "--keep-last", "1")
    assert f"removed {docs[0]['backup_id']}" in pruned.stdout
    gc = ferry("backup", "gc", *common)
    assert "deleted 0 packs" in gc.stdout, gc.stdout


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    key, other, image = tmp_path / "key", tmp_path / "other", tmp_path / "image"
    mixed_image(image, count=4)
    ferry_here("backup", "keygen", "--out", key)
    ferry_here("backup", "keygen", "--out", other)
    target = tmp_path / "target"
    ferry_here("backup", "create", "--target", target, "--key-file", key, "--image", image)
    wrong = ferry_here("backup", "list", "--target", target, "--key-file", other)
    assert wrong.returncode == 1
    assert "use the key the backups were made with" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    no_target = ferry_here("backup", "list", "--key-file", key)
    assert no_target.returncode == 1 and "FERRY_BACKUP_TARGET" in no_target.stderr
    relative = ferry_here("backup", "list", "--target", "relative/dir", "--key-file", key)
    assert "absolute path" in relative.stderr
    bad_id = ferry_here("restore", "../../etc", "--target", target, "--key-file", key, "--to", "/x")
    assert bad_id.returncode == 1 and "is not a backup id" in bad_id.stderr
    tampered = next((target / "packs").rglob("*"))
    while tampered.is_dir():
        tampered = next(tampered.iterdir())
    data = bytearray(tampered.read_bytes())
    data[100] ^= 1  # inside the first block
    tampered.write_bytes(bytes(data))
    verify = ferry_here("backup", "verify", "--target", target, "--key-file", key)
    assert verify.returncode == 1 and "FAILED" in verify.stderr


def test_s3_settings_from_a_mounted_secret(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    settings = s3_settings(s3_endpoint, s3_bucket)
    for name, value in {
        "endpoint": settings.endpoint_url,
        "region": settings.region,
        "access-key-id": settings.access_key_id,
        "secret-access-key": settings.secret_access_key,
    }.items():
        (secret / name).write_text(f"{value}\n")  # Secrets often end in a newline
    key, image = tmp_path / "key", tmp_path / "image"
    mixed_image(image, count=4)
    ferry_here("backup", "keygen", "--out", key)
    location = f"s3://{s3_bucket}/cli-test"
    env_args = ("--target", location, "--s3-config", secret, "--key-file", key)
    made = ferry_here("backup", "create", *env_args, "--image", image, "--quiet")
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    whole_bucket = S3Target(replace(settings, prefix=""))
    assert "cli-test/config" in {s.key for s in whole_bucket.list("cli-test/")}
    listed = ferry_here("backup", "list", *env_args)
    assert listed.returncode == 0 and "image" in listed.stdout
    missing = ferry_here(
        "backup",
        "list",
        "--target",
        f"s3://no-such-bucket-{s3_bucket}",
        "--s3-config",
        secret,
        "--key-file",
        key,
    )
    assert missing.returncode == 1 and "create the bucket" in missing.stderr


#: ``ferry restore`` whose progress sends the process SIGINT (the operator's Ctrl-C)
#: once ``limit`` bytes are restored: mid-way, at a known point.
CTRL_C_CHILD = """
import os, signal, sys
from csi_driver.backup import command
from csi_driver.backup.repository import Progress
from csi_driver.cli import main

limit = int(sys.argv[1])


class CtrlC(Progress):
    done = 0

    def advance(self, done_bytes):
        self.done += done_bytes
        if self.done >= limit:
            os.kill(os.getpid(), signal.SIGINT)


command._progress = lambda args: CtrlC()
sys.exit(main(sys.argv[2:]))
"""


def test_an_interrupted_restore_says_where_it_waits_and_the_same_command_resumes(
    tmp_path: Path,
) -> None:
    key, target, image = tmp_path / "key", tmp_path / "target", tmp_path / "image"
    mixed_image(image, count=48)
    common = ("--target", target, "--key-file", key)
    assert ferry_here("backup", "keygen", "--out", key).returncode == 0
    made = ferry_here(
        "backup", "create", *common, "--image", image, "--name", "db", "--chunk-size", str(CHUNK)
    )
    assert made.returncode == 0, made.stderr
    listed = ferry_here("backup", "list", *common, "--json")
    backup_id = json.loads(listed.stdout.splitlines()[0])["backup_id"]
    restored = tmp_path / "restored"
    command = ("restore", backup_id, *common, "--to", restored)

    child = subprocess.run(
        [sys.executable, "-c", CTRL_C_CHILD, str(4 * CHUNK), *map(str, command)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 130, child.stderr
    assert "Traceback" not in child.stderr
    (part,) = tmp_path.glob(".restored.*.part")
    assert f"interrupted; the {part.stat().st_blocks * 512} bytes" in child.stderr
    assert f"kept in {part}: run the same command again to resume" in child.stderr
    assert not restored.exists()

    again = ferry_here(*command, "--quiet")
    assert again.returncode == 0, again.stderr
    kept = int(again.stdout.split(" kept from an earlier try")[0].rsplit(", ", 1)[1].split()[0])
    assert kept >= 3  # the chunks the interrupted run wrote were not fetched again
    assert restored.read_bytes() == image.read_bytes()
    assert list(tmp_path.glob(".restored*")) == []

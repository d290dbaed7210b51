"""Backups: a volume image as a chunk stream into a target, and back (DESIGN.md,
"Everything is a chunk stream").

A target is a filesystem directory (the embedded default) or an S3-compatible
bucket. What lands there is useless without the operator's key: 64 KiB
blocks are named by a keyed hash, compressed and encrypted client-side one by
one and stored many to a pack (:mod:`.packs`), and pack indexes and manifests
are sealed (encrypted and authenticated). The layout and its invariants are in
:mod:`.repository`; the public entry points for other parts of Ferry are
:func:`.repository.backup_image` and :func:`.repository.restore_image`, and
:func:`.volumes.restore_volume` for restoring into a Ferry volume's image.
"""

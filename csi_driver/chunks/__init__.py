"""Point-in-time images as chunk manifests, deltas between them, change detection,
and the replica generations deltas are applied into (DESIGN.md, "Everything is
a chunk stream")."""

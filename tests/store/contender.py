"""A leader-election contender in its own process, for the election tests.

``python -m tests.store.contender URL NAME CANDIDATE [TLS_DIR]`` campaigns for NAME on
the catalog at URL, prints ``LEADER <fence revision>`` once it leads and
``LOST`` if it loses leadership, and otherwise runs until it is killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.store.backends import open_url


def main(url: str, name: str, candidate: str, tls_dir: str = "") -> int:
    store = open_url(url, Path(tls_dir) if tls_dir else None)
    election = store.election(name, candidate)
    print("CAMPAIGNING", flush=True)
    election.campaign()
    print(f"LEADER {election.fence().revision}", flush=True)
    election.wait_lost()
    print("LOST", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))

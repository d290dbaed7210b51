"""Controller tests use the node tests' real pool and agent fixtures."""

from tests.node.conftest import agent, host_dir, kubelet, pool

__all__ = ["agent", "host_dir", "kubelet", "pool"]

"""A multi-node Ferry on one machine: ``ferry sandbox``.

An etcd, a controller and N node services run as real processes; the control
plane (etcd and controller) and each node sit in their own network namespace,
joined by veth pairs to one Linux bridge. Every name the sandbox gives the host
(namespaces, links) starts with its unique prefix, and every file it makes lives
under its directory, so ``down`` can find and remove all of it even after the
sandbox itself crashed.
"""

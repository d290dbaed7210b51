"""The gRPC edge every Ferry server shares: CSI, the node agent, the catalog, transfers.

``errors`` maps domain errors to status codes in one place and wraps each
servicer method (context, deadline, metrics, required fields); ``validate``
holds the required-field checks. It imports only ``core`` and gRPC, so any
service may use it without reaching into another's package.
"""

"""What Ferry tells Kubernetes and learns from it: the one narrow Kubernetes module.

Only :mod:`csi_driver.kube.api` imports the ``kubernetes`` client. The rest
is pure and runs anywhere: which Event to emit for a move, a failover or a
replication falling behind, and its words (:mod:`.events`); how a Node's
Ready condition and taints read as placement's
:class:`~csi_driver.core.placement.NodeReadiness` (:mod:`.nodes`).

Reconcilers report through :class:`~csi_driver.kube.events.MobilityEvents`
over an :class:`~csi_driver.kube.events.EventSink`: in a cluster the sink
posts Events on the volume's PersistentVolumeClaim; without one
(:func:`csi_driver.kube.api.event_sink` decides) it only logs. An Event is
best effort: a failure to post one is logged and never fails the operation
it reports on.
"""

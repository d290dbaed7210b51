"""Reconcilers' machinery: informers (list + watch), a work queue, runners, waits.

Sized-for-Python counterpart of controller-runtime: an ``informer.Informer``
caches one key prefix and reports which keys changed; a ``runner.Runner``
feeds those keys through a deduplicating ``queue.WorkQueue`` to a reconcile
function, with backoff and periodic resync; ``wait.wait_for`` is the
controller's "write intent, then wait for the owner's status".
"""

"""Node-to-node chunk streams over gRPC and mutual TLS: a sending node exports
point-in-time images (:mod:`.source`), a receiving node pulls what it lacks into
a replica generation (:mod:`.receiver`), with progress as a value, metrics and
logs (:mod:`.progress`)."""

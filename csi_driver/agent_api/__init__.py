"""Ferry's internal node-agent API (``proto/ferry/v1/agent.proto``) over gRPC."""

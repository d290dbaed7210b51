"""The catalog as a network service (``proto/ferry/v1/catalog.proto``) over gRPC."""

"""TLS building blocks for config, health checks and the data plane: contexts, ClientHello, streams."""

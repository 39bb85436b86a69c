"""The data plane: readiness backends (io/), and later the listener, connection and relay."""

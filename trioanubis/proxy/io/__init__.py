"""Readiness backends for relay sockets."""

"""trioanubis: a TCP (layer 4) load balancer on Trio."""

__version__ = "0.1.0"

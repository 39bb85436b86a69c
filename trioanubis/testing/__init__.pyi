# The thread kit's public names (trioanubis/testing/__init__.py imports them on first use).
from trioanubis.testing.thread import Kit as Kit
from trioanubis.testing.thread import ProxyHandle as ProxyHandle
from trioanubis.testing.thread import proxy as proxy

__all__ = ["Kit", "ProxyHandle", "proxy"]

# The public API's types (trioanubis/__init__.py imports these names on first use).
from trioanubis.config import Address as Address
from trioanubis.config import Config as Config
from trioanubis.config import ConfigError as ConfigError
from trioanubis.errors import AnubisError as AnubisError
from trioanubis.testing.embed import BalancerHandle as BalancerHandle
from trioanubis.testing.embed import open_balancer as open_balancer

__version__: str

def compiled() -> bool: ...

__all__ = [
    "Address",
    "AnubisError",
    "BalancerHandle",
    "Config",
    "ConfigError",
    "__version__",
    "compiled",
    "open_balancer",
]

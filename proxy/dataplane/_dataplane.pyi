"""Types of the Rust data plane's extension (proxy/dataplane/py, used by native.py).

An incomplete stub (PEP 484): every name is Any until its classes are written
out here, as _frames.pyi does for the C frame parser."""

from typing import Any

def __getattr__(name: str) -> Any: ...

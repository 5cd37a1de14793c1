"""Only the compiled part of the build; everything else is in pyproject.toml.

proxy/dataplane/py is the data plane's Python face (issue 16), a Rust crate
built by setuptools-rust into loopwatch.proxy.dataplane._dataplane; it needs a
Rust toolchain (cargo). Wheels are release builds; editable installs
(`pip install -e .`, `make install`) are release builds too, because the tests
drive real traffic through it (proxy/dataplane/README.md has the build times);
LOOPWATCH_RUST_DEBUG=1 makes an editable build a debug one.
"""

import os

from setuptools import setup
from setuptools_rust import Binding, RustExtension

setup(
    rust_extensions=[
        RustExtension(
            "loopwatch.proxy.dataplane._dataplane",
            path="proxy/dataplane/py/Cargo.toml",
            binding=Binding.PyO3,
            debug=os.environ.get("LOOPWATCH_RUST_DEBUG") == "1",
        )
    ],
)

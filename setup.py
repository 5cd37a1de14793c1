"""Only the compiled parts of the build; everything else is in pyproject.toml.

proxy/dataplane/_frames.c is the C build of the relay's frame-header parser. It is
optional for an install (no compiler: loopwatch.proxy.dataplane.frames falls back to the
pure-Python parser, same results), but tests/test_frames.py fails when it is
missing, so CI cannot pass without it.

proxy/dataplane/py is the compiled data plane's Python face (issue 16), a Rust
crate built by setuptools-rust into loopwatch.proxy.dataplane._dataplane; it needs
a Rust toolchain (cargo). Wheels are release builds; editable installs
(`pip install -e .`, `make install`) are release builds too, because the tests
drive real traffic through it (proxy/dataplane/README.md has the build times);
LOOPWATCH_RUST_DEBUG=1 makes an editable build a debug one.
"""

import os

from setuptools import Extension, setup
from setuptools_rust import Binding, RustExtension

setup(
    ext_modules=[
        Extension(
            "loopwatch.proxy.dataplane._frames",
            sources=["proxy/dataplane/_frames.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ],
    rust_extensions=[
        RustExtension(
            "loopwatch.proxy.dataplane._dataplane",
            path="proxy/dataplane/py/Cargo.toml",
            binding=Binding.PyO3,
            debug=os.environ.get("LOOPWATCH_RUST_DEBUG") == "1",
        )
    ],
)

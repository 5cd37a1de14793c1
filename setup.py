"""Only the compiled part of the build; everything else is in pyproject.toml.

proxy/dataplane/_frames.c is the C build of the relay's frame-header parser. It is
optional for an install (no compiler: loopwatch.proxy.dataplane.frames falls back to the
pure-Python parser, same results), but tests/test_frames.py fails when it is
missing, so CI cannot pass without it.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "loopwatch.proxy.dataplane._frames",
            sources=["proxy/dataplane/_frames.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)

"""`python -m loopwatch`: the same command line as the `loopwatch` script."""

from loopwatch.proxy.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

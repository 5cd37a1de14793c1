"""What the `loopwatch run` process settles before anything else, the quarter
second of imports and the config included: imported first by the command line
(proxy/app/cli.py).

* SIGHUP is ignored until the reload handler is installed (runtime.serve). Its
  default action ends the process: a reload sent during start-up (a config
  reloader sidecar, `systemctl reload` racing a start) killed it with 129.
  SIGUSR1 and SIGUSR2 too (runtime.IGNORED_SIGNALS: logged once running).
* Standard descriptors closed at exec are reopened on /dev/null, as daemons
  do: otherwise the first socket takes descriptor 1 or 2, and libuv aborts
  (`uv__close: Assertion fd > STDERR_FILENO`) before listening, silently when
  stderr is the one closed.
"""

from __future__ import annotations

import os
import signal
import sys


def settle(argv: list[str]) -> None:
    if argv[1:2] != ["run"]:
        return  # the other commands keep the defaults a terminal expects
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


settle(sys.argv)

"""Preloaded by the ranks' forkserver (launcher/local.py): when the launcher exits, the server leaves
at once instead of finalising an interpreter that imported torch and transformers (~1.3 s). It holds
the job's stdout and stderr (the ranks inherit them from it) until it is gone, so `lmforge train … |
tee log` and a caller reading the output would wait for that teardown."""

import atexit
import os

_SERVER = os.getpid()


def _leave() -> None:
    if os.getpid() == _SERVER:  # a forked rank inherits this handler (and leaves by its own os._exit)
        os._exit(0)


atexit.register(_leave)

"""What every launcher shares: the error a launcher raises for a request it cannot start (the CLI
prints it on one line and exits 2, like a config error).

    lmforge launch --on ray configs/debug.yaml --address 127.0.0.5:6379   # "launch error: cannot reach …"
"""

from __future__ import annotations


class LaunchError(RuntimeError):
    pass

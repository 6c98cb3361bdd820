"""lmforge.launcher: where ranks run (local, Ray, Slurm) and the `lmforge` CLI. This package imports
no torch: the CLI starts the ranks' forkserver before the driver's own heavy imports."""


class LaunchError(RuntimeError):
    """A request a launcher cannot start: the CLI prints it on one line and exits 2, like a config error."""

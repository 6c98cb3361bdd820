"""lmforge.launcher: where ranks run (local, and later Ray and Slurm) and the `lmforge` CLI."""

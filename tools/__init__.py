"""lmforge.tools: driver-side tools around training: plan (before); export, compress, prune, report (after)."""

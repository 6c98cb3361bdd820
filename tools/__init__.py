"""lmforge.tools: after training (consolidate, compress, export, report)."""

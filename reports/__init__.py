"""Reports: pure functions from recorded results to figures, tables and claim verdicts."""

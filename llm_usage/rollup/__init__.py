"""Monthly invoice lines from stored usage (built in its own issue)."""

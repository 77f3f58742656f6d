"""The budget consumer: spend per scope and period, and alerts that fire exactly once."""

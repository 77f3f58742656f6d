"""The rules two or more workers or the API share, as plain values and functions: money, UTC
periods, ids, budgets, policies and usage totals. No I/O and no clock of its own."""

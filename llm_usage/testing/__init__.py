"""Helpers the tests, the benchmarks and the soak share; nothing in the product imports them."""

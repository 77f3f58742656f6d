"""Kafka adapters: the clients every worker builds, and topic administration."""

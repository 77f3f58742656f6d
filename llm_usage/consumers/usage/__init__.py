"""The usage consumer: each event stored once in llm_usage_events."""

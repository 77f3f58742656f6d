"""`python -m llm_usage` is the same as the `llm-usage` command."""

from llm_usage.cli.main import main

main()

"""docs/contract.md names every setting the code reads, so the two cannot drift apart."""

from __future__ import annotations

from pathlib import Path

from llm_usage.core.settings import Settings

CONTRACT = Path(__file__).parents[2] / "docs" / "contract.md"


def undocumented_settings(contract: str) -> list[str]:
    """The environment variables of `Settings` that the contract's configuration section omits."""
    configuration = contract[contract.index("## Configuration") :]
    return [
        name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in configuration
    ]


def test_every_environment_variable_is_in_the_contracts_configuration() -> None:
    assert undocumented_settings(CONTRACT.read_text(encoding="utf-8")) == []


def test_the_check_sees_an_undocumented_variable() -> None:
    text = CONTRACT.read_text(encoding="utf-8").replace("`USAGE_TOPIC`", "the usage topic")
    assert undocumented_settings(text) == ["USAGE_TOPIC"]

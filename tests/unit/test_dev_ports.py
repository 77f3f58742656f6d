"""`dev up --kafka-port` values that cannot work fail before anything is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_usage.core.errors import ConfigurationError
from llm_usage.local.dev import dev_up


@pytest.mark.parametrize(("port", "nodes"), [(65535, 1), (65531, 3), (0, 1)])
def test_a_port_range_past_65535_is_refused_in_one_line(
    port: int, nodes: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_USAGE_STATE_DIR", str(tmp_path / "state"))

    with pytest.raises(ConfigurationError, match=rf"^--kafka-port {port} is out of range"):
        dev_up(kafka_port=port, nodes=nodes, say=lambda _: None)

    assert not (tmp_path / "state").exists()

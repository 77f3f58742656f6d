"""The alerting rules (deploy/prometheus) and the dashboard (deploy/grafana), checked by a real
promtool: the rules load and pass every lint, each alert's unit tests pass (it fires on series that
should page and stays silent on series that should not), and every dashboard query parses.

promtool is built from the Prometheus Go module, pinned, once per machine
(`tests.tools.promtool`): the first build takes ~7-10 minutes, later sessions reuse it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llm_usage.core.errors import LocalServiceError
from tests.artifacts.monitoring import (
    DASHBOARDS,
    PROMETHEUS_CONFIGS,
    ROOT,
    RULE_TESTS,
    RULES,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    github_anchors,
    with_expr,
)
from tests.tools.promtool import (
    BUILD_TIMEOUT_SECONDS,
    PROMTOOL_VERSION,
    GoMissingError,
    ensure_promtool,
    promtool_path,
)
from tests.unavailable import service_unavailable

OPERATIONS = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning"}
# Grafana's own variables, replaced by values of the same kind to check the PromQL around them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$consumer": ".+",
}
# The first test that asks for promtool may build it.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 300)


# --- promtool. ---


@pytest.fixture(scope="session")
def promtool() -> Path:
    """The pinned promtool, built once per machine (a first build takes ~7-10 minutes)."""
    try:
        return ensure_promtool(progress=True)
    except GoMissingError as error:
        missing, problem = True, str(error)
    except LocalServiceError as error:
        missing, problem = False, str(error)
    if missing:
        service_unavailable(problem)
    pytest.fail(problem, pytrace=False)


def run_promtool(promtool: Path, *args: str | Path, cwd: Path = ROOT) -> tuple[int, str]:
    result = subprocess.run(
        [str(promtool), *map(str, args)],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_there_are_rules_tests_and_a_dashboard() -> None:
    assert RULES, "no rule files in deploy/prometheus/rules"
    assert RULE_TESTS, "no promtool tests in deploy/prometheus/tests"
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    assert len(alert_rules()) >= 10


def test_the_rules_load_and_pass_every_lint(promtool: Path) -> None:
    code, output = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", *RULES)
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=[p.name for p in PROMETHEUS_CONFIGS])
def test_the_prometheus_configs_load_the_rules(promtool: Path, config: Path) -> None:
    code, output = run_promtool(promtool, "check", "config", config)
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_unit_tests_pass(promtool: Path, test_file: Path) -> None:
    code, output = run_promtool(promtool, "test", "rules", test_file)
    assert code == 0, output
    assert "SUCCESS" in output, output


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert has an evaluation that expects it firing and one that expects silence."""
    tests = "\n".join(path.read_text() for path in RULE_TESTS)
    checks = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*(\[\])?", tests)
    firing = {name for name, empty in checks if not empty}
    silent = {name for name, empty in checks if empty}
    names = {rule.name for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("alert", [rule.name for rule in alert_rules()])
def test_each_alert_unit_test_fails_when_the_alert_never_fires(
    promtool: Path, alert: str, tmp_path: Path
) -> None:
    """The unit tests really hold the alert to firing: with an expr that never returns a series
    (and with one that always does, labelled like nothing real), some unit test fails."""
    [rule] = [rule for rule in alert_rules() if rule.name == alert]
    for broken in ("vector(1) == 0", "vector(1)"):
        rules = tmp_path / "rules"
        rules.mkdir(exist_ok=True)
        (rules / rule.path.name).write_text(with_expr(rule.path.read_text(), alert, broken))
        tests = tmp_path / "tests"
        tests.mkdir(exist_ok=True)
        for test_file in RULE_TESTS:
            (tests / test_file.name).write_text(test_file.read_text())
        code, output = run_promtool(promtool, "test", "rules", *sorted(tests.glob("*.yaml")))
        assert code != 0, f"with `expr: {broken}` every unit test still passes:\n{output}"
        assert alert in output, output


def test_each_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        assert rule.field("severity") in SEVERITIES, rule.block
        for annotation in ("summary", "description"):
            assert rule.field(annotation), f"{rule.name} has no {annotation}"
        runbook = rule.field("runbook")
        assert runbook is not None, f"{rule.name} has no runbook"
        page, _, anchor = runbook.partition("#")
        assert page == "docs/operations.md", runbook
        assert anchor in anchors, f"{rule.name}: docs/operations.md has no section #{anchor}"


def test_every_dashboard_query_is_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """Each panel's query, Grafana's variables filled in, as a recording rule promtool parses."""
    lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
    count = 0
    for dashboard in DASHBOARDS:
        for where, query in dashboard_queries(dashboard):
            expr = query
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{dashboard.name} {where}: an unknown variable in {expr}"
            count += 1
            lines += [
                f"      - record: dashboard:query_{count}",
                f"        expr: {json.dumps(expr)}",  # a JSON string is a YAML string
            ]
    rules = tmp_path / "dashboard-queries.yaml"
    rules.write_text("\n".join(lines) + "\n")
    code, output = run_promtool(promtool, "check", "rules", rules)
    assert code == 0, output
    assert f"SUCCESS: {count} rules found" in output, output


def test_the_dashboard_is_well_formed() -> None:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = list(dashboard_panels(dashboard["panels"]))
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        assert dashboard["uid"], path.name
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
        _assert_no_overlap(path.name, [p for p in panels if "gridPos" in p])


def _assert_no_overlap(name: str, panels: list[dict[str, Any]]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = taken.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{name}: {panel['title']!r} covers {other!r}"


# --- The build helper itself, with a stand-in `go` (seconds, not the real 10-minute build). ---

FAKE_GO = """#!/bin/sh
# A stand-in for `go install ...@version`: counts its runs, then does what $FAKE_GO_MODE says.
echo run >> "$FAKE_GO_RUNS"
case "$FAKE_GO_MODE" in
  fail) echo "go: downloading example.com/mod v1.0.0"; echo "go: example.com/mod: 404 Not Found"
        exit 1 ;;
  hang) echo $$ > "$FAKE_GO_RUNS.pid"; sleep 600 ;;
esac
sleep 0.5
printf '#!/bin/sh\\necho "promtool, version fake"\\n' > "$GOBIN/promtool"
chmod +x "$GOBIN/promtool"
"""


@pytest.fixture
def fake_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `go` on PATH that 'builds' a promtool; returns the file that counts its runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    runs = tmp_path / "go-runs"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GO_RUNS", str(runs))
    monkeypatch.setenv("FAKE_GO_MODE", "build")
    return runs


def go_runs(runs: Path) -> int:
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_promtool_is_built_once_into_the_cache_by_two_callers_at_once(
    fake_go: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    built: list[Path] = []
    callers = [
        threading.Thread(target=lambda: built.append(ensure_promtool(cache))) for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    binary = cache / "promtool" / PROMTOOL_VERSION / "promtool"
    assert built == [binary, binary]
    assert binary == promtool_path(cache)
    assert go_runs(fake_go) == 1
    assert subprocess.run([binary], capture_output=True, text=True, check=True).stdout == (
        "promtool, version fake\n"
    )
    # Nothing half-built is left beside it, and later calls never run `go`.
    assert sorted(p.name for p in binary.parent.iterdir()) == [".lock", "promtool"]
    assert ensure_promtool(cache) == binary
    assert go_runs(fake_go) == 1


def test_a_failed_build_says_why_in_one_line_and_leaves_nothing(
    fake_go: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_GO_MODE", "fail")
    cache = tmp_path / "cache"
    with pytest.raises(LocalServiceError, match=r"example.com/mod: 404 Not Found") as failed:
        ensure_promtool(cache)
    assert "downloading" not in str(failed.value)
    assert "\n" not in str(failed.value)
    assert sorted(p.name for p in promtool_path(cache).parent.iterdir()) == [".lock"]
    # The next call tries again.
    monkeypatch.setenv("FAKE_GO_MODE", "build")
    assert ensure_promtool(cache).exists()
    assert go_runs(fake_go) == 2


def test_a_build_past_its_timeout_is_stopped_with_everything_it_started(
    fake_go: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_GO_MODE", "hang")
    cache = tmp_path / "cache"
    started = time.monotonic()
    with pytest.raises(LocalServiceError, match="took longer than 2 s"):
        ensure_promtool(cache, timeout=2)
    assert time.monotonic() - started < 30
    pid = int(Path(f"{fake_go}.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not promtool_path(cache).exists()


def test_without_go_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GoMissingError, match=r"`go` is not on PATH: install Go 1\.26"):
        ensure_promtool(tmp_path / "cache")

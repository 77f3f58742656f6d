"""The alerting rules (deploy/prometheus) and the dashboard (deploy/grafana), checked by a real
promtool: the rules load and pass every lint, each alert's unit tests pass (it fires on series that
should page and stays silent on series that should not, with two namespaces in one Prometheus),
every rule and dashboard query keeps namespaces apart, and every dashboard query parses.

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

import jsonschema
import pytest
import yaml

from llm_usage.core.errors import LocalServiceError
from tests.artifacts.deploy import closed_schema
from tests.artifacts.monitoring import (
    DASHBOARDS,
    OPERATOR,
    POD_MONITOR,
    PROMETHEUS_CONFIGS,
    PROMETHEUS_RULE,
    ROOT,
    RULE_TESTS,
    RULES,
    RUNBOOK_BASE,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    dashboard_variable_queries,
    github_anchors,
    prometheus_rule_text,
    recording_rules,
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
STORAGE = ROOT / "docs" / "storage.md"
SEVERITIES = {"critical", "warning"}
# Grafana's own variables, replaced by values of the same kind to check the PromQL around them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$consumer": ".+",
    "$namespace": "llm-usage",
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


def rules_found(path: Path) -> str:
    """What `promtool check` says of one rule file: every alerting and recording rule in it."""
    return f"SUCCESS: {len(alert_rules([path])) + len(recording_rules([path]))} rules found"


def test_the_rules_load_and_pass_every_lint(promtool: Path) -> None:
    code, output = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", *RULES)
    assert code == 0, output
    for path in RULES:
        assert f"Checking {path}\n  {rules_found(path)}" in output, output


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=[p.name for p in PROMETHEUS_CONFIGS])
def test_the_prometheus_configs_load_the_rules(promtool: Path, config: Path) -> None:
    code, output = run_promtool(promtool, "check", "config", config)
    assert code == 0, output
    assert f"SUCCESS: {len(RULES)} rule files found" in output, output
    for path in RULES:
        assert rules_found(path) in output, output


def test_every_rule_test_file_loads_every_rule_file() -> None:
    """A test file without the expected-namespaces rule would test LLMUsageWorkerUnavailable
    against a Prometheus that has none."""
    for test_file in RULE_TESTS:
        text = test_file.read_text()
        for path in RULES:
            loaded = f"- ../rules/{path.name}\n" in text
            assert loaded, f"{test_file.name} does not load {path.name}"


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
        for path in RULES:
            (rules / path.name).write_text(path.read_text())
        (rules / rule.path.name).write_text(with_expr(rule.path.read_text(), alert, broken))
        tests = tmp_path / "tests"
        tests.mkdir(exist_ok=True)
        for test_file in RULE_TESTS:
            (tests / test_file.name).write_text(test_file.read_text())
        code, output = run_promtool(promtool, "test", "rules", *sorted(tests.glob("*.yaml")))
        assert code != 0, f"with `expr: {broken}` every unit test still passes:\n{output}"
        assert alert in output, output


def test_each_alert_has_a_severity_a_summary_a_description_and_a_runbook_url() -> None:
    """`runbook_url` (the annotation Alertmanager templates and Grafana link) is absolute: the
    repository's placeholder base and the alert's section of docs/operations.md (of
    docs/storage.md for the storage's alerts)."""
    pages = {
        f"{RUNBOOK_BASE}docs/{page.name}": github_anchors(page.read_text())
        for page in (OPERATIONS, STORAGE)
    }
    for rule in alert_rules():
        assert rule.field("severity") in SEVERITIES, rule.block
        for annotation in ("summary", "description"):
            assert rule.field(annotation), f"{rule.name} has no {annotation}"
        assert rule.field("runbook") is None, f"{rule.name}: `runbook` is now `runbook_url`"
        runbook = rule.field("runbook_url")
        assert runbook is not None, f"{rule.name} has no runbook_url"
        page, _, anchor = runbook.partition("#")
        assert page in pages, runbook
        assert anchor in pages[page], f"{rule.name}: {page} has no section #{anchor}"
        assert anchor == rule.name.lower(), f"{rule.name}: its runbook is #{anchor}"


# --- Namespaces: a dev namespace in the same Prometheus never masks a prod outage. ---

# An aggregation or a vector match: `sum by (...)`, `max by(...)`, `on (...)`, `ignoring (...)`.
_GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
_AGGREGATION = re.compile(r"\b(sum|max|min|avg|count|group|topk|bottomk|quantile)\s*\(")


def namespace_problems(where: str, query: str) -> list[str]:
    """Each `by`/`on` list names namespace; no aggregation drops every label (`sum(...)`)."""
    problems = []
    for keyword, labels in _GROUPING.findall(query):
        names = {label.strip() for label in labels.split(",")}
        if keyword in ("by", "on") and "namespace" not in names:
            problems.append(f"{where}: `{keyword} ({labels})` merges namespaces")
        if keyword in ("without", "ignoring") and "namespace" in names:
            problems.append(f"{where}: `{keyword} ({labels})` merges namespaces")
    for found in _AGGREGATION.finditer(query):
        before = query[: found.start()].rstrip()
        if not re.search(r"\b(by|without)\s*\([^)]*\)\s*$", before):
            problems.append(f"{where}: `{found.group(1)}(...)` without by (namespace, ...)")
    return problems


def test_a_query_that_merges_namespaces_is_caught() -> None:
    assert namespace_problems("x", "max by (namespace, job) (m) == 0") == []
    assert namespace_problems("x", "a and on (namespace, job, instance) b") == []
    assert namespace_problems("x", "max by (job) (m) == 0") != []
    assert namespace_problems("x", "a and on (job, instance) b") != []
    assert namespace_problems("x", "sum(rate(m[5m]))") != []
    assert namespace_problems("x", "sum without (namespace) (m)") != []


def test_every_rule_keeps_namespaces_apart() -> None:
    problems = [
        problem
        for rule in alert_rules() + recording_rules()
        for problem in namespace_problems(rule.name, rule.expr)
    ]
    assert problems == []


def test_every_dashboard_query_selects_and_keeps_the_namespace() -> None:
    """Every panel selects `namespace="$namespace"` on each metric it reads, so one namespace is
    shown at a time, and groups by namespace where it aggregates."""
    for dashboard in DASHBOARDS:
        variables = json.loads(dashboard.read_text())["templating"]["list"]
        [namespace] = [v for v in variables if v["name"] == "namespace"]
        assert namespace["type"] == "query"
        # One namespace at a time: "All" would add prod and dev up again.
        assert not namespace.get("multi"), namespace
        assert not namespace.get("includeAll"), namespace
        for where, query in dashboard_queries(dashboard):
            assert namespace_problems(where, query) == []
            for selector in re.findall(r"\b(?:llm_usage_\w+|up|ALERTS)\b(\{[^}]*\})?", query):
                assert 'namespace="$namespace"' in selector, f"{where}: {query}"
        for query in dashboard_variable_queries(dashboard):
            if not query.startswith("label_values(up{"):
                assert 'namespace="$namespace"' in query, query


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


# --- The Prometheus Operator's objects: the same rules and targets. ---


def operator_schema_problems(obj: dict[str, Any], schema_file: str) -> list[str]:
    loaded = json.loads((OPERATOR / "schemas" / schema_file).read_text())
    validator = jsonschema.Draft7Validator(closed_schema(loaded))
    return [
        f"{error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=str)
    ]


OPERATOR_OBJECTS = [
    (PROMETHEUS_RULE, "monitoring.coreos.com_prometheusrule_v1.json"),
    (POD_MONITOR, "monitoring.coreos.com_podmonitor_v1.json"),
]


def test_the_prometheus_rule_is_made_from_the_rule_files() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text(), (
        "deploy/prometheus/operator/prometheusrule.yaml is out of date: "
        "run `.venv/bin/python -m tests.artifacts.monitoring`"
    )
    groups = [group for path in RULES for group in yaml.safe_load(path.read_text())["groups"]]
    assert yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"] == groups


@pytest.mark.parametrize(("path", "schema_file"), OPERATOR_OBJECTS, ids=lambda p: str(p)[-24:])
def test_the_operator_objects_are_valid(path: Path, schema_file: str) -> None:
    obj = yaml.safe_load(path.read_text())
    assert operator_schema_problems(obj, schema_file) == []
    # And a misspelt field is caught.
    obj["spec"]["unknownField"] = True
    assert any("unknownField" in p for p in operator_schema_problems(obj, schema_file))


def test_the_pod_monitor_scrapes_every_pipeline_pod_as_the_job_the_rules_select() -> None:
    """Each Deployment and StatefulSet of deploy/k8s/base is selected by the PodMonitor, has a
    port one of its endpoints names, and is labelled with a job name the rules select."""
    monitor = yaml.safe_load(POD_MONITOR.read_text())["spec"]
    [down] = [rule for rule in alert_rules() if rule.name == "LLMUsageWorkerDown"]
    found = re.search(r'job=~"([^"]+)"', down.expr)
    assert found is not None, down.expr
    jobs = set(found.group(1).split("|"))
    assert monitor["namespaceSelector"] == {"any": True}
    endpoints = {endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]}
    selector = monitor["selector"]["matchLabels"]
    base = ROOT / "deploy" / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    common = {
        key: value
        for entry in kustomization.get("labels", [])
        if entry.get("includeTemplates")
        for key, value in entry["pairs"].items()
    }
    scraped = set()
    for manifest in sorted(base.glob("*.yaml")):
        for obj in yaml.safe_load_all(manifest.read_text()):
            if not obj or obj.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            template = obj["spec"]["template"]
            labels = {**common, **template["metadata"].get("labels", {})}
            assert selector.items() <= labels.items(), f"{manifest.name}: not selected"
            ports = {
                port.get("name")
                for container in template["spec"]["containers"]
                for port in container.get("ports", [])
            }
            assert len(ports & endpoints) == 1, f"{manifest.name}: ports {ports}"
            scraped.add(labels[monitor["jobLabel"]])
    assert scraped == jobs


def test_the_api_rules_and_panels_name_real_routes() -> None:
    """The routes the API rules and panels leave out (the probes, /metrics) are route templates
    the app really labels its requests with: a renamed probe would silently count again."""
    from llm_usage.api.routes import probes  # noqa: PLC0415 - FastAPI, only here

    # The app includes the probes' router without a prefix: these are its route templates.
    routes = {path for route in probes.router.routes if (path := getattr(route, "path", None))}
    queries = [rule.expr for rule in alert_rules() if "llm_usage_api_" in rule.expr]
    queries += [q for d in DASHBOARDS for _, q in dashboard_queries(d) if "llm_usage_api_" in q]
    named = {
        alternative
        for query in queries
        for pattern in re.findall(r'route\s*(?:=~|!~|!=|=)\s*"([^"]+)"', query)
        for alternative in pattern.split("|")
    }
    assert named >= {"/healthz", "/readyz", "/metrics"}
    assert named <= routes, named - routes


# --- prometheus-kubernetes.yml's relabelling, applied to pods like deploy/k8s's. ---


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabel_configs (replace, keep, drop) on one target; None when dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(
            labels.get(name, "") for name in config.get("source_labels", [])
        )
        found = re.fullmatch(str(config.get("regex", "(.*)")), value)
        if action == "keep" and found is None:
            return None
        if action == "drop" and found is not None:
            return None
        if action == "replace" and found is not None:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", str(config.get("replacement", "$1")))
            new = found.expand(replacement)
            if new:
                labels[config["target_label"]] = new
            else:
                labels.pop(config["target_label"], None)
    return labels


def pod_targets(
    namespace: str,
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    ports: list[tuple[str, int]],
) -> list[dict[str, str]]:
    """What Kubernetes SD's pod role makes of a pod: one target per container port."""

    def meta(kind: str, key: str) -> str:
        return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    common = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_phase": "Running",
        **{meta("label", key): value for key, value in labels.items()},
        **{meta("annotation", key): value for key, value in annotations.items()},
    }
    if not ports:
        return [{**common, "__address__": "10.0.0.9"}]
    return [
        {
            **common,
            "__address__": f"10.0.0.9:{port}",
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_container_port_number": str(port),
        }
        for port_name, port in ports
    ]


def scraped_as(config: dict[str, Any], targets: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(job, namespace, address) of every target some scrape job keeps."""
    kept = []
    for job in config["scrape_configs"]:
        for target in targets:
            labels = relabel({"job": job["job_name"], **target}, job.get("relabel_configs", []))
            if labels is not None:
                kept.append((labels["job"], labels["namespace"], labels["__address__"]))
    return kept


def test_kubernetes_scrapes_each_worker_and_the_api_once_as_the_rules_jobs() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIGS[1].read_text())
    part_of = {"app.kubernetes.io/part-of": "llm-usage-pipeline"}
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9108",
        "prometheus.io/path": "/metrics",
    }
    worker = {**part_of, "app.kubernetes.io/name": "llm-usage-consume-usage"}
    api = {
        **part_of,
        "app.kubernetes.io/name": "llm-usage-api",
        "app.kubernetes.io/component": "api",
    }
    api_scrape = {**scrape, "prometheus.io/port": "8080"}
    cases = [
        (
            pod_targets("llm-usage", "usage-0", worker, scrape, [("metrics", 9108)]),
            [("llm-usage-consume-usage", "llm-usage", "10.0.0.9:9108")],
        ),
        (
            pod_targets("llm-usage-dev", "usage-0", worker, scrape, [("metrics", 9108)]),
            [("llm-usage-consume-usage", "llm-usage-dev", "10.0.0.9:9108")],
        ),
        # The API's pods ask for a scrape too; they are scraped once, by the api job.
        (
            pod_targets("llm-usage", "api-1", api, api_scrape, [("http", 8080)]),
            [("llm-usage-api", "llm-usage", "10.0.0.9:8080")],
        ),
        (
            pod_targets("llm-usage", "api-2", api, {}, [("http", 8080)]),
            [("llm-usage-api", "llm-usage", "10.0.0.9:8080")],
        ),
        # The migrate Job's pod has no port and asks nothing; another app's pod is not ours.
        (
            pod_targets(
                "llm-usage",
                "migrate-x",
                {**part_of, "app.kubernetes.io/name": "llm-usage-migrate"},
                {},
                [],
            ),
            [],
        ),
        (
            pod_targets(
                "llm-usage", "other", {"app.kubernetes.io/name": "x"}, scrape, [("metrics", 9108)]
            ),
            [],
        ),
    ]
    for targets, expected in cases:
        assert scraped_as(config, targets) == expected, targets[0]["__meta_kubernetes_pod_name"]

"""The monitoring artifacts as files: the alerting rules (deploy/prometheus) read without a YAML
library, and the queries of the Grafana dashboards (deploy/grafana). Shared by the promtool
checks (tests/artifacts) and the metric-name check against a running worker (tests/integration).

`python -m tests.artifacts.monitoring` writes the Prometheus Operator's PrometheusRule
(deploy/prometheus/operator/prometheusrule.yaml) from the rule files; a test holds it to them.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yaml"))
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yaml"))
# For compose (the scrape jobs by name), and for Kubernetes (jobs from the pods' labels).
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS_CONFIGS = [PROMETHEUS_CONFIG, PROMETHEUS_CONFIG.with_name("prometheus-kubernetes.yml")]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# The Prometheus Operator's objects: the PrometheusRule made from RULES, the PodMonitor.
OPERATOR = ROOT / "deploy" / "prometheus" / "operator"
PROMETHEUS_RULE = OPERATOR / "prometheusrule.yaml"
POD_MONITOR = OPERATOR / "podmonitor.yaml"
# Where every alert's `runbook_url` points: a placeholder for where the repository is browsed
# (docs/operations.md, "Alerts", says to replace it).
RUNBOOK_BASE = "https://github.com/example/llm-usage-pipeline/blob/main/"

# --- Reading the rule files: our own layout, without a YAML library (the project has none). ---


@dataclass(frozen=True)
class AlertRule:
    name: str
    path: Path
    block: str  # the rule's lines, from `- alert:` to the next rule or group
    expr: str

    def field(self, key: str) -> str | None:
        """A `key: value` line's value inside the rule (labels and annotations included)."""
        found = re.search(rf"^\s+{re.escape(key)}:\s*(.+?)\s*$", self.block, re.MULTILINE)
        return found.group(1).strip("\"'") if found else None


_RULE_START = re.compile(r"^(?P<indent>\s*)- (?:alert|record): (?P<name>\S+)\s*$", re.MULTILINE)


def alert_rules(paths: list[Path] = RULES) -> list[AlertRule]:
    return [rule for path in paths for rule in alert_rules_of_text(path.read_text(), path)]


def recording_rules(paths: list[Path] = RULES) -> list[AlertRule]:
    """The recording rules, as AlertRule with the recorded name as `name`."""
    return [
        rule
        for path in paths
        for rule in alert_rules_of_text(path.read_text(), path, kind="record")
    ]


def alert_rules_of_text(text: str, path: Path = Path(), kind: str = "alert") -> list[AlertRule]:
    """The alerting rules (or, with kind="record", the recording rules) of one rules file."""
    starts = list(_RULE_START.finditer(text))
    rules = []
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        # A rule's block ends where the next rule, or the next group, begins.
        block = re.split(r"^\s*- name: ", text[start.start() : end], maxsplit=1, flags=re.M)[0]
        if block.lstrip().startswith(f"- {kind}:"):
            rules.append(AlertRule(start["name"], path, block, _expr_of(block)))
    return rules


def _expr_of(block: str) -> str:
    """The rule's `expr`: one line, or a `|` block scalar (its more-indented lines)."""
    lines = block.splitlines()
    for index, line in enumerate(lines):
        found = re.match(r"^(\s+)expr:\s*(.*)$", line)
        if found is None:
            continue
        indent, value = len(found.group(1)), found.group(2).strip()
        if value not in ("|", "|-", ">", ">-"):
            return value
        body = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        return "\n".join(body).strip()
    raise AssertionError(f"a rule without expr:\n{block}")


def with_expr(text: str, alert: str, expr: str) -> str:
    """The rules file `text` with the expr of `alert` replaced by a one-line `expr`."""
    [rule] = [r for r in alert_rules_of_text(text) if r.name == alert]
    lines = rule.block.splitlines(keepends=True)
    out: list[str] = []
    skipping_indent: int | None = None
    for line in lines:
        if skipping_indent is not None:
            if line.strip() and len(line) - len(line.lstrip()) <= skipping_indent:
                skipping_indent = None
            else:
                continue
        found = re.match(r"^(\s+)expr:", line)
        if found is not None:
            out.append(f"{found.group(1)}expr: {expr}\n")
            skipping_indent = len(found.group(1))
            continue
        out.append(line)
    return text.replace(rule.block, "".join(out), 1)


def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query in a Grafana dashboard: panel targets and annotations."""
    dashboard = json.loads(path.read_text())
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", annotation["expr"]


def dashboard_variable_queries(path: Path) -> Iterator[str]:
    """The queries of the dashboard's query variables (Grafana's label_values(...), not PromQL)."""
    for variable in json.loads(path.read_text()).get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else str(query)


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.MULTILINE):
        text = unicodedata.normalize("NFKC", heading).lower()
        text = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchors.add(text)
    return anchors


# --- The Prometheus Operator's PrometheusRule, made from the rule files. ---

_PROMETHEUS_RULE_HEAD = """\
# GENERATED from deploy/prometheus/rules/*.yaml by `python -m tests.artifacts.monitoring`: edit
# the rule files and run it again (tests/artifacts/test_prometheus_rules.py holds this file to
# them). For a Prometheus run by the Prometheus Operator, instead of loading rules/*.yaml.
#
# Apply it once per cluster, in the namespace your Prometheus reads rules from (its
# ruleNamespaceSelector), and give it the labels its ruleSelector asks for: the rules aggregate
# by (namespace, job) across every namespace that runs the pipeline. A Prometheus with
# enforcedNamespaceLabel would confine them to this object's namespace: list this object under
# its excludedFromEnforcement.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: llm-usage-pipeline
  labels:
    app.kubernetes.io/name: llm-usage-pipeline
    app.kubernetes.io/part-of: llm-usage-pipeline
spec:
  groups:
"""


def prometheus_rule_text(paths: list[Path] = RULES) -> str:
    """The PrometheusRule whose spec.groups are the groups of every rule file, in order: each
    file's text from its `groups:` line on, indented under `spec:`."""
    parts = [_PROMETHEUS_RULE_HEAD]
    for path in paths:
        lines = path.read_text().splitlines()
        start = lines.index("groups:") + 1
        parts.append(f"    # deploy/prometheus/rules/{path.name}\n")
        parts.extend(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return "".join(parts)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text())
    sys.stdout.write(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}\n")

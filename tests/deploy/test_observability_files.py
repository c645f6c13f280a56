"""deploy/grafana-dashboard.json and deploy/alerts.yml against the daemon's and the receiver's
own metrics, and the rules through Prometheus' own `promtool`.

Every metric a dashboard panel or an alert rule names must be one a process exposes, with the
labels it has: a renamed metric would otherwise leave an empty panel and an alert that can never
fire. The names are taken from the registry's exposition (as Prometheus scrapes it), so the
`_total`, `_bucket`, `_count`, `_sum` and `_info` suffixes are the real ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from worker.metrics import OUTCOMES, Metrics
from worker.webhook.metrics import WebhookMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "alerts.test.yml"

METRIC = re.compile(r"\bwhatsapp_worker_\w+")
SELECTOR = re.compile(r"\b(whatsapp_worker_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped sample
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# What the issue asks the dashboard and the rules to show.
DASHBOARD_NEEDS = {
    "whatsapp_worker_messages_total",
    "whatsapp_worker_send_seconds_bucket",
    "whatsapp_worker_in_flight",
    "whatsapp_worker_queue_due",
    "whatsapp_worker_oldest_due_age_seconds",
    "whatsapp_worker_sending_paused",
    "whatsapp_worker_last_sent_timestamp_seconds",
    "whatsapp_worker_webhook_requests_total",
    "whatsapp_worker_webhook_ack_seconds_bucket",
    "whatsapp_worker_webhook_statuses_total",
    "whatsapp_worker_webhook_pending_statuses",
    "whatsapp_worker_webhook_earlier_sends_total",
}


@cache
def exposed() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, from a scrape of a daemon's and a receiver's registry."""
    metrics = Metrics()
    metrics.paused({("1234567890", "190")})  # a labelled gauge shows no sample until it has a child
    metrics.finished("sent", 0.1)
    names: dict[str, set[str]] = {}
    for registry in (metrics.registry, WebhookMetrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in names.items()}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[str]:
    board = dashboard()
    queries = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return queries


def alerts() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe").load(ALERTS)
    return loaded


def rules() -> list[dict[str, Any]]:
    return [rule for group in alerts()["groups"] for rule in group["rules"]]


def check_names_and_labels(expr: str) -> list[str]:
    """What is wrong with one PromQL expression's use of our metrics (nothing: [])."""
    problems = []
    names = set(METRIC.findall(expr))
    for name in sorted(names - set(exposed())):
        problems.append(f"{name} is not exposed by worker/metrics.py or worker/webhook/metrics.py")
    known = TARGET_LABELS.union(*(exposed().get(name, frozenset()) for name in names))
    for name, matchers in SELECTOR.findall(expr):
        for label, _op, value in MATCHER.findall(matchers):
            if label not in exposed().get(name, frozenset()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            if label == "outcome" and not set(value.split("|")) <= set(OUTCOMES):
                problems.append(f"outcome {value!r} is not one of {OUTCOMES}")
    for group in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if names and label not in known:
                problems.append(f"grouping by {label!r}, a label none of {sorted(names)} has")
    return problems


def test_the_exposition_has_the_suffixed_names_this_test_relies_on() -> None:
    names = set(exposed())
    assert {
        "whatsapp_worker_messages_total",
        "whatsapp_worker_send_seconds_bucket",
        "whatsapp_worker_send_seconds_count",
        "whatsapp_worker_send_seconds_sum",
        "whatsapp_worker_build_info",
    } <= names
    assert exposed()["whatsapp_worker_send_seconds_bucket"] == {"le"}
    assert exposed()["whatsapp_worker_sending_paused"] == {"phone_number_id", "reason"}
    # the checker itself notices a wrong name, a wrong suffix, a wrong label and a wrong value
    assert check_names_and_labels('whatsapp_worker_messages{outcome="sent"}')
    assert check_names_and_labels("rate(whatsapp_worker_send_seconds_total[5m])")
    assert check_names_and_labels('whatsapp_worker_in_flight{reason="x"}')
    assert check_names_and_labels('whatsapp_worker_messages_total{outcome="delivered"}')
    assert check_names_and_labels("sum by (outcomes) (whatsapp_worker_messages_total)")
    assert not check_names_and_labels('sum by (le) (whatsapp_worker_send_seconds_bucket{job="w"})')


def test_every_dashboard_query_names_exposed_metrics_and_labels() -> None:
    queries = dashboard_queries()
    problems = [f"{q!r}: {p}" for q in queries for p in check_names_and_labels(q)]
    assert problems == []
    used = {name for q in queries for name in METRIC.findall(q)}
    assert used >= DASHBOARD_NEEDS, DASHBOARD_NEEDS - used


def test_the_dashboard_is_a_grafana_dashboard_over_a_chosen_prometheus() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["title"] and panel["type"] in {"stat", "timeseries", "table"}, panel
        assert (
            set(panel["gridPos"]) == {"x", "y", "w", "h"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)


def test_the_rules_file_has_prometheus_rule_group_structure() -> None:
    document = alerts()
    assert set(document) == {"groups"} and document["groups"]
    group_names = [group["name"] for group in document["groups"]]
    assert len(set(group_names)) == len(group_names)
    alert_names = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert DURATION.match(str(rule.get("for", "0s"))), rule
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert all(isinstance(v, str) for v in rule["labels"].values())
            assert {"summary", "description"} <= set(rule["annotations"])
            alert_names.append(rule["alert"])
    assert len(set(alert_names)) == len(alert_names)


def test_every_rule_names_exposed_metrics_and_labels() -> None:
    problems = [f"{r['alert']}: {p}" for r in rules() for p in check_names_and_labels(r["expr"])]
    assert problems == []


def test_the_rules_cover_the_operators_questions() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules()}

    def alert_on(*parts: str) -> list[str]:
        return [name for name, expr in exprs.items() if all(part in expr for part in parts)]

    assert alert_on("whatsapp_worker_sending_paused", "== 1")  # paused for a while
    assert alert_on("increase(whatsapp_worker_messages_total", 'outcome="unknown"')  # unknown outcomes rising
    assert alert_on("whatsapp_worker_oldest_due_age_seconds", ">")  # oldest due row too old
    assert alert_on("absent(up{")  # no daemon scraped at all
    assert alert_on("whatsapp_worker_queue_due", "whatsapp_worker_last_sent_timestamp_seconds")  # no send
    # the receiver: a rotated app secret, a database that refuses, statuses waiting, double sends
    assert alert_on("whatsapp_worker_webhook_requests_total", 'result="bad_signature"')
    assert alert_on('result=~"failed|overloaded"', 'result="stored"')  # refused or shed, none stored
    assert alert_on("whatsapp_worker_webhook_pending_statuses")
    assert alert_on("whatsapp_worker_webhook_earlier_sends_total")
    assert alert_on('up{job="whatsapp-worker-webhook"}')


def test_the_promtool_unit_tests_exercise_every_alert() -> None:
    document: dict[str, Any] = YAML(typ="safe").load(ALERT_TESTS)
    assert document["rule_files"] == [ALERTS.name]
    tested = {case["alertname"] for test in document["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in rules()}
    fired = {
        case["alertname"]
        for test in document["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired >= {
        "WhatsAppWorkerSendingPaused",
        "WhatsAppWorkerUnknownOutcomes",
        "WhatsAppWorkerOldestDueTooOld",
        "WhatsAppWorkerNotSending",
        "WhatsAppWorkerAbsent",
        "WhatsAppWebhookSignatureFailing",
        "WhatsAppWebhookNotStoring",
        "WhatsAppWebhookStatusesWaiting",
    }


def test_prometheus_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's `prometheus` package (`make test` does)"
    for command in (["check", "rules", ALERTS.name], ["test", "rules", ALERT_TESTS.name]):
        done = subprocess.run(
            [promtool, *command], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr

"""deploy/monitoring: ``promtool check config`` and ``check rules`` pass, the alert unit tests
(``promtool test rules``) pass and fail when a rule breaks, every service is scraped on its
port, and every query of the alerts and of the Grafana dashboard parses (promtool) and reads
only metrics the code exports (read from the source, so a renamed metric fails here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.artifacts import (
    DEFAULT_PORTS,
    DEPLOY,
    promql_metrics,
    run,
    show,
    source_metrics,
    tool,
)

MON = DEPLOY / "monitoring"


def promtool(*args: str, cwd: Path = MON) -> None:
    proc = run([tool("promtool"), *args], cwd=cwd)
    assert proc.returncode == 0, show(proc)


def exported_series() -> set[str]:
    return {s for series in source_metrics().values() for s in series}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MON / "alerts.yml").read_text("utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    doc = json.loads((MON / "grafana-dashboard.json").read_text("utf-8"))
    panels: list[dict[str, Any]] = []
    for p in doc["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_promtool_checks_the_scrape_config_and_its_rule_file() -> None:
    promtool("check", "config", "prometheus.yml")


def test_promtool_checks_the_alert_rules() -> None:
    promtool("check", "rules", "alerts.yml")


def test_alert_unit_tests_pass() -> None:
    promtool("test", "rules", "tests/alerts_test.yml")


def test_alert_unit_tests_fail_when_a_rule_breaks(tmp_path: Path) -> None:
    copy = tmp_path / "monitoring"
    shutil.copytree(MON, copy)
    alerts = copy / "alerts.yml"
    text = alerts.read_text("utf-8")
    assert "expr: prvng_audit_mirror_remote_ok == 0" in text
    alerts.write_text(text.replace("remote_ok == 0", "remote_ok == 2"), "utf-8")
    proc = run([tool("promtool"), "test", "rules", "tests/alerts_test.yml"], cwd=copy)
    assert proc.returncode != 0, show(proc)
    assert "PrvngAuditMirrorRemotePushFailing" in proc.stdout + proc.stderr, show(proc)


def test_alert_unit_tests_exercise_firing_and_quiet_cases_of_several_alerts() -> None:
    doc = yaml.safe_load((MON / "tests" / "alerts_test.yml").read_text("utf-8"))
    cases = [c for t in doc["tests"] for c in t["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert len(firing) >= 2 and len(firing & quiet) >= 2, (firing, quiet)
    assert firing <= {r["alert"] for r in rules()}


def test_every_service_is_scraped_at_metrics_on_its_default_port() -> None:
    doc = yaml.safe_load((MON / "prometheus.yml").read_text("utf-8"))
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert doc["rule_files"] == ["alerts.yml"]
    for service, port in DEFAULT_PORTS.items():
        job = jobs[f"prvng-{service}"]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets and all(t.endswith(f":{port}") for t in targets), (service, targets)


def test_alerts_cover_down_queue_failures_stream_lag_and_the_audit_mirror() -> None:
    by_name = {r["alert"]: r for r in rules()}
    reads = {name: promql_metrics(r["expr"]) for name, r in by_name.items()}
    assert 'up{job=~"prvng-.*"} == 0' in by_name["PrvngServiceDown"]["expr"]
    assert "prvng_queue_depth" in reads["PrvngQueueGrowing"]
    assert "prvng_workflows" in reads["PrvngWorkflowFailureRate"]
    assert "prvng_controller_dispatched" in reads["PrvngOpsDispatchStuck"]
    assert "prvng_keeper_ops" in reads["PrvngOpsNotPublished"]
    assert {"prvng_audit_mirror_last_commit_timestamp", "prvng_keeper_audit_published"} <= reads[
        "PrvngAuditMirrorBehind"
    ]
    assert (
        "prvng_audit_mirror_remote_ok == 0" in by_name["PrvngAuditMirrorRemotePushFailing"]["expr"]
    )
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alert_rules_read_only_metrics_the_code_exports() -> None:
    exported = exported_series()
    for rule in rules():
        unknown = promql_metrics(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} reads metrics no service exports: {unknown}"


def test_every_dashboard_query_parses_and_reads_exported_metrics(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert exprs
    exported = exported_series()
    for expr in exprs:
        unknown = promql_metrics(expr) - exported
        assert not unknown, f"dashboard query reads metrics no service exports: {unknown}\n{expr}"
    # promtool parses PromQL when it checks rules: every query as a recording rule.
    grafana_vars = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    recorded = []
    for i, expr in enumerate(exprs):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        recorded.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": recorded}]}), "utf-8")
    promtool("check", "rules", str(rules_file), cwd=tmp_path)


def test_dashboard_shows_every_metric_the_alerts_watch_and_every_service() -> None:
    on_dashboard = set().union(*(promql_metrics(e) for e in dashboard_exprs()))
    for rule in rules():
        missing = promql_metrics(rule["expr"]) - on_dashboard
        assert not missing, f"{rule['alert']} watches metrics the dashboard lacks: {missing}"
    assert any('up{job=~"prvng-.*"}' in e for e in dashboard_exprs())
    for prefix in (
        "prvng_queue_depth",
        "prvng_keeper_",
        "prvng_controller_",
        "prvng_audit_mirror_",
    ):
        assert any(m.startswith(prefix) for m in on_dashboard), prefix


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    doc = json.loads((MON / "grafana-dashboard.json").read_text("utf-8"))
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in doc["templating"]["list"]}
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"].strip("${}") in variables, p["title"]
        assert all(t["refId"] for t in p["targets"])

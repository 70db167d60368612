"""Checks of monitoring/: Prometheus config and rules with promtool, and the Grafana dashboards."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ddn_dist.metrics import MetricsConfig, TrainMetrics
from tests.fixtures.prometheus import (
    DASHBOARD_DIR,
    MONITORING,
    dashboard_queries,
    metric_names_in,
    substitute_grafana_variables,
)

SCHEMA_DIR = MONITORING / "schema"
RULE_FILES = [MONITORING / "rules" / "recording.yml", MONITORING / "rules" / "alerts.yml"]


def promtool(*args: str, **kwargs) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed; run scripts/install_services.sh")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, **kwargs)


def exported_sample_names() -> set[str]:
    """Sample names in the exposition of a real registry after every kind of observation."""
    m = TrainMetrics(
        MetricsConfig(enabled=True), run="r", job_id="1", rank=0, local_rank=0, node="n",
        world_size=1, config_hash="x", gpu=True,
    )
    m.observe_step(
        images=4, kimg=0.004, step_seconds=0.1, data_wait_seconds=0.01, loss=1.0,
        group_losses={"8x8": 1.0}, grad_norm=1.0, lr=1e-3,
    )
    m.split_prune("8x8", 1)
    m.node_frequency_spread("8x8", 0.1)
    m.checkpoint_saved(0.2)
    m.update_storage({"bytes_read": 1})
    payload = generate_latest(m.registry).decode()
    return {s.name for f in text_string_to_metric_families(payload) for s in f.samples}


def recorded_names() -> set[str]:
    rules = yaml.safe_load(RULE_FILES[0].read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"]}


def alert_rules() -> list[dict]:
    rules = yaml.safe_load(RULE_FILES[1].read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


def test_promtool_check_config():
    result = promtool("check", "config", str(MONITORING / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_check_rules():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = promtool("test", "rules", str(MONITORING / "rules" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_firing_unit_test():
    tests = yaml.safe_load((MONITORING / "rules" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they stay quiet"


def test_rules_use_exported_metrics():
    allowed = exported_sample_names() | recorded_names() | {"up"}
    rules = yaml.safe_load(RULE_FILES[0].read_text())["groups"][0]["rules"] + alert_rules()
    for rule in rules:
        name = rule.get("record") or rule.get("alert")
        unknown = metric_names_in(rule["expr"]) - allowed
        assert unknown == set(), f"rule {name} uses metrics nobody exports"


def test_panel_queries_use_exported_metrics():
    exported = exported_sample_names()
    queries = dashboard_queries()
    assert len(queries) > 30
    for dashboard, title, expr in queries:
        names = metric_names_in(expr)
        assert names, f"{dashboard} panel {title!r} selects no metric"
        assert names - exported == set(), f"{dashboard} panel {title!r} uses unexported metrics"


def test_panel_queries_parse(tmp_path):
    rules = [
        {"record": f"panel:query_{i}", "expr": substitute_grafana_variables(expr)}
        for i, (_, _, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_templated_by_run_and_job():
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        assert set(variables) == {"datasource", "run", "job_id"}, path.name
        assert "ddn_run_info" in variables["run"]["query"]
    for dashboard, title, expr in dashboard_queries():
        assert 'run=~"$run"' in expr, f"{dashboard} panel {title!r} ignores the run variable"
        assert 'job_id=~"$job_id"' in expr, f"{dashboard} panel {title!r} ignores the job variable"


def test_dashboards_cover_required_views():
    titles = {}
    for path in DASHBOARD_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        titles[dashboard["uid"]] = {panel["title"] for panel in dashboard["panels"]}
    assert {"Progress", "Images per second", "Loss", "ETA"} <= titles["ddn-run-overview"]
    assert "Data wait share of step time" in titles["ddn-data-pipeline"]
    assert "Mean step time by rank" in titles["ddn-stragglers"]
    assert "Time since last checkpoint" in titles["ddn-checkpoints-faults"]


def test_dashboards_match_generator():
    script = MONITORING / "grafana" / "generate_dashboards.py"
    rendered = runpy.run_path(str(script), run_name="generate_dashboards")["render_all"]()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARD_DIR.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, (
            f"{name} differs from generate_dashboards.py; rerun the script"
        )


def test_provisioning_files():
    datasources = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "dashboards" / "ddn.yml").read_text()
    )
    assert providers["apiVersion"] == 1
    assert providers["providers"][0]["type"] == "file"
    assert providers["providers"][0]["options"]["path"]


def run_schema_check(*files: str) -> subprocess.CompletedProcess:
    if shutil.which("node") is None or not (SCHEMA_DIR / "node_modules" / "@grafana").is_dir():
        pytest.skip("node and @grafana/schema are needed; run scripts/install_services.sh")
    return subprocess.run(["bash", str(SCHEMA_DIR / "check_dashboards.sh"), *files],
                          capture_output=True, text=True, timeout=300)


def test_dashboards_pass_grafana_schema():
    result = run_schema_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 4 dashboard(s)" in result.stdout


def test_schema_check_rejects_bad_dashboard(tmp_path):
    dashboard = json.loads((DASHBOARD_DIR / "ddn-stragglers.json").read_text())
    dashboard["graphTooltip"] = 7  # not a DashboardCursorSync value
    del dashboard["schemaVersion"]  # required
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dashboard))
    result = run_schema_check(str(path))
    assert result.returncode != 0
    assert "DashboardCursorSync" in result.stdout

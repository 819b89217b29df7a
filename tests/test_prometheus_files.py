"""The shipped Prometheus files: alert rules pass their promtool unit tests, and every PromQL
expression of the Grafana dashboard is valid PromQL according to promtool."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from conftest import require_tool

PROMETHEUS_DIR = Path(__file__).parent.parent / "packaging" / "prometheus"
# Grafana's variables, replaced by values Prometheus accepts, as Grafana would before querying.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$listener": ".*"}


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_alerts_cover_every_condition() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "UdpbinddDown", "UdpbinddListenerDown", "UdpbinddListenerWaiting", "UdpbinddKernelDrops",
        "UdpbinddReloadFailed",
    }  # fmt: skip


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((PROMETHEUS_DIR / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    expressions = dashboard_expressions()
    assert len(expressions) >= 7
    rules = []
    for index, text in enumerate(expressions):
        expr = text
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"an unknown Grafana variable is left in {expr!r}"
        rules.append({"record": f"udpbindd:dashboard_expr_{index}", "expr": expr})
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_dashboard_uses_only_exported_metric_names() -> None:
    exported = {
        "udpbindd_received_packets_total", "udpbindd_received_bytes_total",
        "udpbindd_sent_packets_total", "udpbindd_sent_bytes_total",
        "udpbindd_dropped_packets_total", "udpbindd_listener_up", "udpbindd_listener_info",
        "udpbindd_receive_buffer_bytes", "udpbindd_config_last_reload_successful",
        "udpbindd_config_last_reload_success_timestamp_seconds", "udpbindd_build_info",
    }  # fmt: skip
    used = set(re.findall(r"udpbindd_[a-z_]+", " ".join(dashboard_expressions())))
    assert used <= exported, used - exported

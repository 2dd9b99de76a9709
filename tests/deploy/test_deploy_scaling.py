"""Check 10: the ScaledObject's query, unit-tested with `promtool test rules` on synthetic series:
it sums waiting + running over this pool's pods only, and KEDA's AverageValue arithmetic on it
(desired replicas = ceil(sum / threshold)) gives the replica counts the capacity model expects."""

from __future__ import annotations

import yaml
from deploy_support import K8S_GATEWAY, kustomize_build, require_tool, run


def test_scaling_query_with_promtool(tmp_path):
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    (scaled,) = [d for d in kustomize_build(K8S_GATEWAY) if d["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    query, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    assert threshold == 8, "the series below are sized for a threshold of 8"
    ns, svc = "adasd", "adasd"

    def series(name: str, pod: str, values: str, namespace: str = ns, service: str = svc) -> dict:
        labels = f'namespace="{namespace}",service="{service}",pod="{pod}",model_name="m"'
        return {"series": f"{name}{{{labels}}}", "values": values}

    # one sample a minute over 0m..3m: idle, light, full (every slot busy), queueing
    inputs = [
        series("adasd_num_requests_running", "adasd-a", "0 3 8 8"),
        series("adasd_num_requests_waiting", "adasd-a", "0 0 0 5"),
        series("adasd_num_requests_running", "adasd-b", "0 2 8 8"),
        series("adasd_num_requests_waiting", "adasd-b", "0 0 1 7"),
        # another deployment's pods, in another namespace and behind another Service: never counted
        series("adasd_num_requests_running", "other-a", "50 50 50 50", namespace="other"),
        series("adasd_num_requests_waiting", "other-a", "50 50 50 50", namespace="other"),
        series("adasd_num_requests_running", "canary-a", "9 9 9 9", service="adasd-canary"),
        series("adasd_num_requests_waiting", "canary-a", "9 9 9 9", service="adasd-canary"),
    ]
    sums = {"0m": 0, "1m": 5, "2m": 17, "3m": 28}
    desired = {"0m": 0, "1m": 1, "2m": 3, "3m": 4}  # ceil(sum / 8); KEDA keeps minReplicaCount (1) at 0
    tests = []
    for t, total in sums.items():
        tests.append({"expr": query, "eval_time": t, "exp_samples": [{"labels": "{}", "value": total}]})
        tests.append({"expr": f"ceil(({query}) / {threshold:g})", "eval_time": t,
                      "exp_samples": [{"labels": "{}", "value": desired[t]}]})
    suite = {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": tests}]}
    path = tmp_path / "scaling_test.yml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_catches_a_wrong_expectation(tmp_path):
    """The harness above can fail: the same query with a wrong expected sum is reported."""
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    (scaled,) = [d for d in kustomize_build(K8S_GATEWAY) if d["kind"] == "ScaledObject"]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    suite = {"rule_files": [], "tests": [{"interval": "1m", "input_series": [
        {"series": 'adasd_num_requests_running{namespace="adasd",service="adasd",pod="p"}', "values": "4"},
        {"series": 'adasd_num_requests_waiting{namespace="adasd",service="adasd",pod="p"}', "values": "1"}],
        "promql_expr_test": [{"expr": query, "eval_time": "0m", "exp_samples": [{"labels": "{}", "value": 4}]}]}]}
    path = tmp_path / "wrong_test.yml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr

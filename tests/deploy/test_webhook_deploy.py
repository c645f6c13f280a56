"""The webhook receiver's deployment files, checked offline like the daemon's
(tests/unit/test_deployment_files.py): systemd-analyze for the unit, the compose service."""

from __future__ import annotations

import re
import shutil
from itertools import takewhile
from pathlib import Path

from ruamel.yaml import YAML

from tests.deploy.test_deployment_files import (
    COMPOSE,
    DB_TIMEOUT,
    MAX_EXPOSURE,
    ROOT,
    compose,
    run,
    seconds,
    timespan,
    tool,
    unit_entries,
    verify,
)
from worker.exits import EX_CONFIG
from worker.webhook.serve import SHUTDOWN_TIMEOUT
from worker.webhook.settler import SWEEP_EVERY

UNIT = ROOT / "systemd" / "whatsapp-worker-webhook.service"
EXEC_START = "/opt/whatsapp-worker/venv/bin/whatsapp-worker webhook"


def entries() -> dict[str, list[tuple[str, str]]]:
    return unit_entries(UNIT.read_text(encoding="utf-8"))


def one(section: str, key: str) -> str:
    found = [v for k, v in entries().get(section, []) if k == key]
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


def test_webhook_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    installed = tool("whatsapp-worker", venv=True)
    text = UNIT.read_text(encoding="utf-8")
    line = f"ExecStart={EXEC_START}"
    assert text.count(f"\n{line}\n") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"\n{line}\n", f"\nExecStart={installed} webhook\n"), encoding="utf-8")
    result = verify(copy)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify:\n{result.stderr}"


def test_webhook_unit_security_exposure_is_low() -> None:
    result = run([tool("systemd-analyze", venv=False), "security", "--offline=yes", str(UNIT)])
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"Overall exposure level for whatsapp-worker-webhook\.service: (\d+(?:\.\d+)?) (\w+)", result.stdout
    )
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE and match.group(2) == "OK"


def test_webhook_unit_contract() -> None:
    assert one("Service", "Type") == "notify"
    assert one("Service", "ExecStart") == EXEC_START
    # the watchdog is pinged as the sweep goes round: every SWEEP_EVERY, or after a database call
    assert timespan(one("Service", "WatchdogSec")) > SWEEP_EVERY + 3 * DB_TIMEOUT
    # stop: requests in progress, then the writer's and the sweep's database calls
    assert timespan(one("Service", "TimeoutStopSec")) > SHUTDOWN_TIMEOUT + 2 * DB_TIMEOUT
    assert str(EX_CONFIG) in one("Service", "RestartPreventExitStatus").split()
    assert one("Service", "Restart") == "on-failure"
    credentials = dict(v.split(":", 1) for k, v in entries()["Service"] if k == "LoadCredential")
    assert set(credentials) == {"database-url", "app-secret", "verify-token"}
    environment = dict(
        item.split("=", 1) for k, v in entries()["Service"] if k == "Environment" for item in v.split()
    )
    assert environment["WHATSAPP_APP_SECRET_FILE"] == "%d/app-secret"
    assert environment["WHATSAPP_VERIFY_TOKEN_FILE"] == "%d/verify-token"
    assert not {"WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN", "WORKER_DATABASE_URL"} & environment.keys()


def test_compose_webhook_service() -> None:
    spec = compose()
    webhook, worker = spec["services"]["webhook"], spec["services"]["worker"]
    assert webhook["image"] == worker["image"] and webhook["command"] == ["webhook"]
    assert webhook["read_only"] is True and webhook["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in webhook["security_opt"]
    assert webhook["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    environment = webhook["environment"]
    for variable in ("WORKER_DATABASE_URL_FILE", "WHATSAPP_APP_SECRET_FILE", "WHATSAPP_VERIFY_TOKEN_FILE"):
        secret = environment[variable].removeprefix("/run/secrets/")
        assert secret in webhook["secrets"] and secret in spec["secrets"], variable
    assert not {"WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"} & environment.keys()
    # published on the host's loopback only: the TLS reverse proxy is the public side
    assert all(str(port).startswith("127.0.0.1:") for port in webhook["ports"])
    # the image's HEALTHCHECK asks the daemon's pidfile: the receiver's own connects to its port
    test = webhook["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and f"'127.0.0.1', {environment['WORKER_WEBHOOK_PORT']})" in test[1]
    assert seconds(webhook["stop_grace_period"]) > SHUTDOWN_TIMEOUT + 2 * DB_TIMEOUT


def comment_block(text: str, first: str) -> str:
    """The YAML quoted in a comment that starts with `first`, without the comment signs."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*#\s+{first}", line))
    prefix = lines[start].index(first)
    block = takewhile(lambda line: line.strip().startswith("#") and len(line) > prefix, lines[start:])
    return "\n".join(line[prefix:] for line in block)


def test_compose_serves_metrics_to_the_documented_scrape_jobs(tmp_path: Path) -> None:
    services = compose()["services"]
    worker, webhook = services["worker"]["environment"], services["webhook"]["environment"]
    ports = {
        "worker": int(worker["WORKER_METRICS_PORT"]),
        "webhook": int(webhook["WORKER_WEBHOOK_METRICS_PORT"]),
    }
    assert ports["webhook"] != int(webhook["WORKER_WEBHOOK_PORT"])  # never on the public /webhook port
    # 127.0.0.1 inside a container is the container's own: listen where the network reaches
    assert worker["WORKER_METRICS_HOST"] == webhook["WORKER_METRICS_HOST"] == "0.0.0.0"
    for name, port in ports.items():
        assert str(port) in map(str, services[name]["expose"])
        published = [str(p) for p in services[name].get("ports", []) if str(p).endswith(f":{port}")]
        assert all(p.startswith("127.0.0.1:") for p in published), published

    # The scrape configuration the compose file's comment gives, checked by Prometheus itself.
    quoted = comment_block(COMPOSE.read_text(encoding="utf-8"), "scrape_configs:")
    jobs = {job["job_name"]: job for job in YAML(typ="safe", pure=True).load(quoted)["scrape_configs"]}
    documented = re.findall(
        r"job_name: ([\w-]+)", (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    )
    assert sorted(jobs) == sorted(set(documented)) == ["whatsapp-worker", "whatsapp-worker-webhook"]
    assert jobs["whatsapp-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": ports["worker"]}
    ]
    assert jobs["whatsapp-worker-webhook"]["static_configs"] == [{"targets": [f"webhook:{ports['webhook']}"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(quoted, encoding="utf-8")
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's `prometheus` package (`make test` does)"
    result = run([promtool, "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr

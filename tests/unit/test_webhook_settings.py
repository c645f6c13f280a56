"""The receiver's connection and memory settings: defaults, reading, and refusals naming the variable."""

from __future__ import annotations

import pytest

from worker.config import ConfigError, Settings

BASE = {"WORKER_DATABASE_URL": "mysql://u:p@db:3306/q", "WORKER_SENDER": "sandbox"}


def test_the_receivers_limits_have_defaults_and_are_read() -> None:
    defaults = Settings.from_env(BASE)
    assert defaults.webhook_idle_timeout == 30.0
    assert defaults.webhook_max_connections == 1000
    assert defaults.webhook_unverified_bytes == 16 * 1_048_576
    read = Settings.from_env(
        {
            **BASE,
            "WORKER_WEBHOOK_IDLE_TIMEOUT": "2.5",
            "WORKER_WEBHOOK_MAX_CONNECTIONS": "20",
            "WORKER_WEBHOOK_MAX_BODY": "4096",
            "WORKER_WEBHOOK_UNVERIFIED_BYTES": "4096",  # one largest body at a time
        }
    )
    assert (read.webhook_idle_timeout, read.webhook_max_connections) == (2.5, 20)
    assert (read.webhook_max_body, read.webhook_unverified_bytes) == (4096, 4096)
    # a large body limit set before this budget existed still starts: the budget follows it
    large = Settings.from_env({**BASE, "WORKER_WEBHOOK_MAX_BODY": str(32 * 1_048_576)})
    assert large.webhook_unverified_bytes == 32 * 1_048_576


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"WORKER_WEBHOOK_IDLE_TIMEOUT": "0"}, "WORKER_WEBHOOK_IDLE_TIMEOUT"),  # 0 would never close
        ({"WORKER_WEBHOOK_IDLE_TIMEOUT": "3601"}, "WORKER_WEBHOOK_IDLE_TIMEOUT"),
        ({"WORKER_WEBHOOK_IDLE_TIMEOUT": "nan"}, "WORKER_WEBHOOK_IDLE_TIMEOUT"),
        ({"WORKER_WEBHOOK_MAX_CONNECTIONS": "0"}, "WORKER_WEBHOOK_MAX_CONNECTIONS"),
        ({"WORKER_WEBHOOK_MAX_CONNECTIONS": "lots"}, "WORKER_WEBHOOK_MAX_CONNECTIONS"),
        ({"WORKER_WEBHOOK_UNVERIFIED_BYTES": "512"}, "WORKER_WEBHOOK_UNVERIFIED_BYTES"),
        # below the largest body it accepts, that body could never be read
        ({"WORKER_WEBHOOK_UNVERIFIED_BYTES": "1048575"}, "WORKER_WEBHOOK_UNVERIFIED_BYTES"),
        (
            {"WORKER_WEBHOOK_MAX_BODY": "65536", "WORKER_WEBHOOK_UNVERIFIED_BYTES": "65535"},
            "WORKER_WEBHOOK_UNVERIFIED_BYTES",
        ),
    ],
)
def test_bad_receiver_limits_fail_naming_the_variable(extra: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name) as caught:
        Settings.from_env({**BASE, **extra})
    assert "\n" not in str(caught.value)

"""The layout is the architecture: two wings (the daemon, the webhook receiver) side by side over
one store, over a ground floor of value types and helpers; `cli/` on top. Checked from the code's
own imports, so a shortcut that breaks a layer fails here rather than in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"
DRIVERS = {"aiomysql", "pymysql"}


def part(module: str) -> str:
    """daemon, webhook, store, cli, or ground (the top-level modules)."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in ("daemon", "webhook", "store", "cli"):
        return parts[1]
    if len(parts) == 2 and parts[1] in ("daemon", "webhook", "store", "cli"):
        return parts[1]  # the package itself
    return "ground"


def modules() -> dict[str, set[str]]:
    """worker module -> the modules it imports (worker's own and third-party roots)."""
    found: dict[str, set[str]] = {}
    for path in WORKER.rglob("*.py"):
        relative = path.relative_to(WORKER.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        found[name] = imported
    return found


ALLOWED = {
    "ground": {"ground"},
    "store": {"ground", "store"},
    "daemon": {"ground", "store", "daemon"},
    "webhook": {"ground", "store", "webhook"},
    "cli": {"ground", "store", "daemon", "webhook", "cli"},
}
KNOWN = modules()


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_each_module_imports_only_its_own_floor_and_those_below(module: str) -> None:
    own = part(module)
    imported = {m for m in KNOWN[module] if m.startswith("worker.") and m in KNOWN}
    wrong = sorted(m for m in imported if part(m) not in ALLOWED[own] and module != "worker.__main__")
    assert wrong == [], f"{module} ({own}) imports {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in KNOWN if part(m) != "store"))
def test_only_the_store_speaks_to_the_database_driver(module: str) -> None:
    assert {m.split(".")[0] for m in KNOWN[module]} & DRIVERS == set(), module


def test_the_two_wings_exist_side_by_side() -> None:
    wings = {part(m) for m in KNOWN}
    assert {"daemon", "webhook", "store", "cli", "ground"} <= wings
    assert "worker.daemon.serve" in KNOWN and "worker.webhook.serve" in KNOWN

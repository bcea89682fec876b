"""Imports flow one way (README, "Layout"): a package may import only what is allowed below.
Parsed from the source, so a new import that breaks the layering fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "outcomewatch"
LEAVES = {"model", "errors", "durations", "clock", "otlp", "otlp_decode", "otlp_limits",
          "otlp_probe", "jsonsafe", "metrics", "__version__", "incident_file", "listeners",
          "lifecycle"}
ALLOWED = {
    "rules": LEAVES,
    "store": LEAVES,
    "receiver": LEAVES,
    "analyzer": LEAVES | {"rules"},
    "incidents": LEAVES | {"config"},
    "config": LEAVES | {"rules"},
    "api": LEAVES | {"store", "rules"},
    "offline": LEAVES | {"analyzer", "rules", "store"},
    "pipeline": LEAVES | {"analyzer", "rules", "store", "config"},
}


def imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("outcomewatch.incidents.lifecycle"):
                parts.add("lifecycle")  # pure, model only: the one lifecycle the store applies
            elif name.startswith("outcomewatch."):
                parts.add(name.split(".")[1])
    return parts


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_component_imports_only_what_lies_below_it(component: str) -> None:
    root = PACKAGE / component
    files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{component}.py"]
    assert files
    for path in files:
        foreign = imported_parts(path) - ALLOWED[component] - {component}
        assert not foreign, f"{path.relative_to(PACKAGE)} imports {sorted(foreign)}"


def test_only_the_cli_imports_the_server_and_nothing_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert not {"cli", "cli_args", "server"} & imported_parts(path), path

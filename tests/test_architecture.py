"""The module map of the README holds: the core imports no Flask and no WebSocket code.

Read from the source (imports at any depth, lazy ones included), following
the package's own imports transitively.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flask_docsync"

CORE = ("errors", "config", "compat", "apps", "transport", "protocol", "fastpatch", "session",
        "scheduler", "aio", "context", "reclaim", "connection", "server", "tokens", "monitor",
        "deploy", "signals", "routing", "handover", "panel", "pubsub", "registry", "relay", "restore")
FLASK_SIDE = ("blueprint", "embed", "extension", "sock", "commands", "cli", "testing")
SOCKET_SIDE = ("websocket",)


def imports_of(module: str) -> set[str]:
    """Package modules and top-level outside packages that ``module`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                found.add(name[len("flask_docsync."):] if name.startswith("flask_docsync.") else name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "from . import x" or "from .x import y"
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("flask_docsync"):
                rest = node.module[len("flask_docsync"):].lstrip(".")
                found.update([rest.split(".")[0]] if rest else [a.name for a in node.names])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def closure(module: str) -> set[str]:
    own = {p.stem for p in PACKAGE.glob("*.py")}
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in imports_of(current) if m in own)
    outside = set()
    for m in seen:
        outside |= {name for name in imports_of(m) if name not in own}
    return seen | outside


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_flask_and_no_websocket_code(module):
    reached = closure(module)
    assert not reached & {"flask", "jinja2", "markupsafe"}, f"{module} reaches Flask: {sorted(reached)}"
    if module != "tokens":
        # tokens.py takes werkzeug's host_is_trusted, a pure function, so that
        # TRUSTED_HOSTS means exactly what it means to Flask; nothing else may.
        assert "werkzeug" not in imports_of(module)
    assert not reached & set(FLASK_SIDE + SOCKET_SIDE), f"{module} reaches {sorted(reached & set(FLASK_SIDE + SOCKET_SIDE))}"


def test_the_websocket_layer_imports_no_flask():
    reached = closure("websocket")
    assert not reached & {"flask", "werkzeug"} and not reached & set(FLASK_SIDE)


def test_every_module_is_on_the_map():
    listed = set(CORE + FLASK_SIDE + SOCKET_SIDE) | {"__init__", "__main__"}
    assert {p.stem for p in PACKAGE.glob("*.py")} == listed
    readme = (PACKAGE.parent / "README.md").read_text()
    for module in CORE + FLASK_SIDE + SOCKET_SIDE:
        assert f"  {module}.py " in readme, f"README's map lacks {module}.py"

"""The structure docs/architecture.md describes, held by tests: who may import whom, and rules
that are stated once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_app_never_imports_workers() -> None:
    offenders = {
        _module(path): sorted(m for m in _imports(path) if m.split(".")[0] == "workers")
        for path in (ROOT / "app").rglob("*.py")
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_services_import_each_other_without_a_cycle() -> None:
    """`app/<module>/service.py` files, and what they reach through the app's other modules:
    no service reaches itself again (the event bus carries side effects the other way)."""
    modules = {_module(p): p for p in (ROOT / "app").rglob("*.py")}
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    services = sorted(n for n in modules if n.endswith(".service"))

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        frontier = list(graph[start])
        while frontier:
            current = frontier.pop()
            if current not in seen:
                seen.add(current)
                frontier += graph[current]
        return seen

    cycles = [s for s in services if s in reaches(s)]
    assert cycles == []


def test_a_webhook_prompt_is_held_to_the_apis_limit() -> None:
    """One limit for every way a task is made: a rule may render as long a prompt as the API
    takes, and no longer."""
    from app.tasks import limits
    from app.tasks.schemas import TaskCreateSchema
    from app.webhooks import matching

    api_max = TaskCreateSchema().fields["prompt"].validators[0].max
    assert api_max == limits.PROMPT_MAX

    def render(length: int) -> dict:
        return matching.render_task(
            {"title": "t", "prompt": "{{ 'x' * n }}"},
            event_type="issues",
            action=None,
            delivery_id="d",
            payload={"n": length},
            extra={},
        )

    assert len(render(api_max)["prompt"]) == api_max
    with pytest.raises(matching.TemplateError, match="rendered more than"):
        render(api_max + 1)

"""Does a rule match an event, and what task does it make? Pure functions of the payload: no
database, so they are easy to reason about and to test.

Conditions (all optional, all must hold):
- `repository`: glob(s) on `repository.full_name`, case-insensitive (`octo-org/*`).
- `label`: the label just added (`label.name`), or else any label of the issue or pull request.
- `command`: a line of the comment (or of the issue/PR body) starting with it, e.g. `/agent`; the
  rest of that line is `command_args` in the templates.
- `branch`: glob(s) on the pushed branch (`refs/heads/<branch>`) or a pull request's base branch.
- `ignore_bots` (default true): deliveries sent by a bot (`sender.type == "Bot"` or a login
  ending in `[bot]`) match nothing, so an agent's own comments cannot trigger it again.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from app.input_bounds import NUL
from app.tasks import limits
from app.webhooks import templates

#: what a title template may render before it is cut to the title's length
TITLE_RENDER_MAX = 64 * 1024
#: what a template is tried against when its rule is saved (a delivery's usual fields)
SAMPLE_PAYLOAD: dict[str, Any] = {
    "action": "opened",
    "issue": {"number": 1, "title": "Sample", "body": "Body", "labels": [{"name": "bug"}]},
    "pull_request": {"number": 2, "title": "Sample", "body": "Body", "base": {"ref": "main"}},
    "comment": {"body": "/agent do it"},
    "repository": {"full_name": "octo/repo", "name": "repo"},
    "sender": {"login": "octocat", "type": "User"},
    "ref": "refs/heads/main",
    "commits": [{"id": "0" * 40, "message": "m"}],
}


@dataclass
class Verdict:
    matched: bool
    context: dict[str, Any] = field(default_factory=dict)


#: what every failed condition answers
NO = Verdict(False)


def _globs(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _any_glob(subject: str | None, patterns: str | list[str]) -> bool:
    if subject is None:
        return False
    return any(fnmatch.fnmatchcase(subject.lower(), p.lower()) for p in _globs(patterns))


def _get(payload: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload


def is_bot(payload: Any) -> bool:
    sender = _get(payload, "sender") or {}
    login = str(sender.get("login") or "")
    return sender.get("type") == "Bot" or login.endswith("[bot]")


def _labels(payload: Any) -> list[str]:
    names = []
    added = _get(payload, "label", "name")
    if added:
        return [added]
    for holder in ("issue", "pull_request"):
        for label in _get(payload, holder, "labels") or []:
            if isinstance(label, dict) and label.get("name"):
                names.append(label["name"])
    return names


def _command_text(payload: Any) -> str:
    for path in (("comment", "body"), ("issue", "body"), ("pull_request", "body")):
        text = _get(payload, *path)
        if isinstance(text, str):
            return text
    return ""


def find_command(text: str, command: str) -> str | None:
    """The arguments after `command` on the first line that starts with it, else None."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == command or stripped.startswith(command + " "):
            return stripped[len(command) :].strip()
    return None


def _branch(payload: Any) -> str | None:
    ref = _get(payload, "ref")
    if isinstance(ref, str) and ref.startswith("refs/heads/"):
        return ref[len("refs/heads/") :]
    return _get(payload, "pull_request", "base", "ref")


def evaluate(rule: Any, event_type: str, action: str | None, payload: Any) -> Verdict:
    """Does `rule` (event, actions, conditions) take this delivery?"""
    if rule.event not in ("*", event_type):
        return NO
    if rule.actions and action not in rule.actions:
        return NO
    cond = rule.conditions or {}
    if cond.get("ignore_bots", True) and is_bot(payload):
        return NO
    if cond.get("repository") and not _any_glob(
        _get(payload, "repository", "full_name"), cond["repository"]
    ):
        return NO
    if cond.get("label") and not any(_any_glob(name, cond["label"]) for name in _labels(payload)):
        return NO
    context: dict[str, Any] = {"command_args": ""}
    if cond.get("command"):
        args = find_command(_command_text(payload), cond["command"])
        if args is None:
            return NO
        context["command_args"] = args
    if cond.get("branch") and not _any_glob(_branch(payload), cond["branch"]):
        return NO
    return Verdict(True, context=context)


def check_template(source: str) -> str | None:
    """Why a template cannot be saved (a syntax error; over its budget on a sample delivery),
    or None; rules are checked when they are saved."""
    context = _context("issues", "opened", "sample", SAMPLE_PAYLOAD, {"command_args": "do it"})
    return templates.check(source, context, limits.PROMPT_MAX)


def _context(
    event_type: str, action: str | None, delivery_id: str, payload: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    context = dict(payload) if isinstance(payload, dict) else {}
    context.update(payload=payload, event=event_type, action=action, delivery=delivery_id, **extra)
    return context


def render_task(
    template: dict[str, Any],
    *,
    event_type: str,
    action: str | None,
    delivery_id: str,
    payload: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Title and prompt rendered from the payload; raises `TemplateError` (e.g. an undefined
    field) for the caller to report on the event."""
    context = _context(event_type, action, delivery_id, payload, extra)
    # a NUL from the payload becomes U+FFFD, as in logs: PostgreSQL's text holds no NUL
    title = templates.render(template["title"], context, TITLE_RENDER_MAX)
    title = title.strip().replace(NUL, "\ufffd")
    prompt = templates.render(template["prompt"], context, limits.PROMPT_MAX)
    prompt = prompt.replace(NUL, "\ufffd")
    if not title:
        raise TemplateError("the title template rendered an empty title")
    rendered = {k: v for k, v in template.items() if k not in ("title", "prompt")}
    rendered.update(title=" ".join(title.split())[: limits.TITLE_MAX], prompt=prompt)
    return rendered

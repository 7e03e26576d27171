"""What a task may hold: one set of limits for every way a task is made (the API's schema, a
webhook rule's template and what it renders, the fast path)."""

from __future__ import annotations

import re

TITLE_MAX = 300
#: characters of a prompt, whoever writes it (a person, a script, a rule's template)
PROMPT_MAX = 512 * 1024
TIMEOUT_MAX_S = 7 * 24 * 3600
ATTEMPTS_MAX = 20
DEPENDENCIES_MAX = 100
LOOP_ITERATIONS_MAX = 1000
DONE_MARKER_MAX = 500
#: where a task runs: the server's worker pool, an executor that claims it over REST, one named
#: machine, or any machine with all the labels
TARGETS = ("pool", "external", "machine:<name>", "labels:<a>,<b>")
#: a machine's name and a machine label (machines are registered under them)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
LABEL_PATTERN = r"[a-z0-9][a-z0-9._:-]{0,62}"
MACHINE_TARGET = "machine:"
LABELS_TARGET = "labels:"
LABELS_MAX = 16


def for_machines(target: str) -> bool:
    """Whether a task with this target runs on a machine (`machine:…`, `labels:…`)."""
    return target.startswith((MACHINE_TARGET, LABELS_TARGET))


def target_refusal(target: str) -> str | None:
    """What is wrong with a target, if anything (every way a task is made asks)."""
    if target in ("pool", "external"):
        return None
    if target.startswith(MACHINE_TARGET):
        if re.fullmatch(NAME_PATTERN, target[len(MACHINE_TARGET) :]):
            return None
        return "machine:<name>, a machine's name"
    if target.startswith(LABELS_TARGET):
        labels = target[len(LABELS_TARGET) :].split(",")
        if 0 < len(labels) <= LABELS_MAX and all(re.fullmatch(LABEL_PATTERN, x) for x in labels):
            return None
        return f"labels:<a>,<b>, 1 to {LABELS_MAX} machine labels"
    return f"one of {', '.join(TARGETS)}"

"""What a task may hold: one set of limits for every way a task is made (the API's schema, a
webhook rule's template and what it renders, the fast path)."""

from __future__ import annotations

TITLE_MAX = 300
#: characters of a prompt, whoever writes it (a person, a script, a rule's template)
PROMPT_MAX = 512 * 1024
TIMEOUT_MAX_S = 7 * 24 * 3600
ATTEMPTS_MAX = 20
DEPENDENCIES_MAX = 100
LOOP_ITERATIONS_MAX = 1000
DONE_MARKER_MAX = 500
#: where a task runs: the server's worker pool, or an executor that claims it over REST
TARGETS = ("pool", "external")

"""`switchboard ask`: an agent asks a person and waits for the answer.

Standard library only, and self-contained: the worker writes this file into each run's home as
an executable `switchboard` (its `bin` first on the agent's PATH), so an agent calls it the same
way inside the sandbox, on a machine, or anywhere the server's own installation is out of sight.
It reads SWITCHBOARD_URL, SWITCHBOARD_RUN_ID and SWITCHBOARD_RUN_TOKEN, which every run has.
Exit status: 0 answered, 2 expired (its default, if any, is printed), 3 cancelled, 1 an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

EXIT = {"answered": 0, "expired": 2, "cancelled": 3}
#: an agent may ask before its start is written; a moment later it is running
NOT_STARTED_RETRY_S = 10.0


class AskError(RuntimeError):
    pass


def _call(base: str, token: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        problem = json.loads(exc.read() or b"{}")
        raise AskError(f"{exc.code}: {problem.get('detail') or exc.reason}") from None
    except OSError as exc:
        raise AskError(f"cannot reach {base}: {exc}") from None


def ask(
    prompt: str,
    *,
    choices: list[str] | None = None,
    text: bool = False,
    timeout: int | None = None,
    default: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ask, wait, and return the question as it ended."""
    env = dict(os.environ if env is None else env)
    run_id, token = env.get("SWITCHBOARD_RUN_ID"), env.get("SWITCHBOARD_RUN_TOKEN")
    if not run_id or not token:
        raise AskError("this is for agents: SWITCHBOARD_RUN_ID and SWITCHBOARD_RUN_TOKEN are unset")
    base = (env.get("SWITCHBOARD_URL") or "http://127.0.0.1:8000").rstrip("/")
    kind = "choice" if choices else "text" if text else "confirm"
    body: dict[str, Any] = {"kind": kind, "prompt": prompt}
    if choices:
        body["options"] = list(choices)
    if timeout:
        body["timeout_s"] = timeout
    if default is not None:
        body["default"] = default
    deadline = time.monotonic() + NOT_STARTED_RETRY_S
    while True:
        try:
            question = _call(base, token, "POST", f"/api/v1/runs/{run_id}/questions", body)
            break
        except AskError as exc:
            if "has not started yet" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    path = f"/api/v1/runs/{run_id}/questions/{question['id']}?wait=30&status=pending"
    while question["status"] == "pending":
        question = _call(base, token, "GET", path)
    return question


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Ask a person from an agent's run and wait."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("ask", help="ask a person and print the answer")
    cmd.add_argument("prompt")
    cmd.add_argument("--choice", action="append", dest="choices", help="an option (twice or more)")
    cmd.add_argument("--text", action="store_true", help="ask for free text (else yes/no)")
    cmd.add_argument("--timeout", type=int, help="seconds until it expires")
    cmd.add_argument("--default", help="the answer when it expires")
    args = parser.parse_args(argv)
    try:
        question = ask(
            args.prompt,
            choices=args.choices,
            text=args.text,
            timeout=args.timeout,
            default=args.default,
        )
    except AskError as exc:
        print(f"switchboard ask: {exc}", file=sys.stderr)
        return 1
    if question.get("answer") is not None:
        print(question["answer"])
    return EXIT.get(question["status"], 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

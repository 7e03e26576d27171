"""RQ job functions: thin. They receive ids, run inside the worker's app context and call
services; running one twice is harmless."""

from __future__ import annotations

from flask import current_app

from app.notifications import service as notifications
from app.reviews import service as reviews
from app.runs.sweep import sweep as run_sweep
from app.subscriptions.deliveries import deliver as send
from app.webhooks.processing import drain
from workers import isolation, workspace
from workers.executor import execute


def execute_run(run_id: int) -> str:
    return execute(run_id)


def sweep() -> dict[str, int]:
    return run_sweep()


def drain_events() -> int:
    return drain()


def deliver(delivery_id: int) -> str:
    return send(delivery_id)


def push_run(run_id: int, pull_request: dict | None) -> str:
    """Push an approved run's branch from its captured bundle, then let the review complete."""
    spec = reviews.push_spec(run_id)
    if spec is None:
        return "skipped"  # not being approved (this job ran already)
    if not spec["bundle"] or not spec["repo_url"]:
        reviews.push_failed(run_id, "nothing to push: the change's commits were not captured")
        return "failed"
    cfg = current_app.config
    try:
        workspace.push(
            cfg["SWITCHBOARD_WORKSPACE_ROOT"],
            spec["project_key"],
            spec["repo_url"],
            spec["branch"],
            spec["head"],
            spec["bundle"],
            policy=isolation.policy(cfg),
            git_token=spec["git_token"],
        )
    except workspace.WorkspaceError as exc:
        reviews.push_failed(run_id, str(exc))
        return "failed"
    reviews.pushed(run_id, pull_request)
    return "pushed"


def send_notification(notification_id: int) -> str:
    return notifications.send(notification_id)

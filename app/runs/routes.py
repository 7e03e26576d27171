from flask import current_app
from flask.views import MethodView

from app.auth.guard import current_principal, requires, run_scoped
from app.database import db
from app.errors import Conflict
from app.extensions import Blueprint
from app.live import pubsub
from app.live.sse import last_event_id, parking, sse, stream_view
from app.live.waiting import WaitQuerySchema, conditional, wait_for_change
from app.projects import service as projects
from app.runs import logs
from app.runs import service as runs
from app.runs.models import RUN_TERMINAL
from app.runs.schemas import (
    CompleteSchema,
    EventPageSchema,
    EventQuerySchema,
    EventReportSchema,
    EventSchema,
    ExecutorSchema,
    HeartbeatResponseSchema,
    LogAppendResponseSchema,
    LogAppendSchema,
    LogPageSchema,
    LogQuerySchema,
    RunPageSchema,
    RunQuerySchema,
    RunSchema,
)
from app.runs.stream import RunFollower

blp = Blueprint(
    "runs",
    __name__,
    url_prefix="/api/v1/runs",
    description="Runs: attempts at a task, their logs and telemetry",
)


def run_for(run_id: int, role: str = "viewer"):  # type: ignore[no-untyped-def]
    return runs.run_for(current_principal(), run_id, role)


@blp.route("")
class Runs(MethodView):
    @requires("projects:read")
    @blp.arguments(RunQuerySchema, location="query")
    @blp.response(200, RunPageSchema)
    def get(self, args):
        """Runs of the projects I can see, newest first."""
        ids = projects.visible_project_ids(current_principal())
        if args.get("project"):
            project = projects.project_for(current_principal(), args["project"])
            ids = [project.id]
        return runs.list_runs(
            ids,
            task_id=args.get("task"),
            status=args.get("status"),
            executor=args.get("executor"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()


@blp.route("/<int:run_id>")
class RunById(MethodView):
    @run_scoped
    @requires("projects:read")
    @conditional
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, RunSchema)
    @blp.alt_response(304, description="Not Modified: the run is as the `If-None-Match` ETag")
    def get(self, args, run_id):
        """A run: status, times, exit code, agent version, cost, tokens, branch and commit.

        With `?wait=`, answers when the run's status changes (long-poll); an `ETag` comes with
        it, and `If-None-Match` gets `304 Not Modified` while it is current."""
        return wait_for_change(
            lambda: run_for(run_id),
            lambda run: RunSchema().dump(run),  # a schema only when waiting
            lambda run: pubsub.run_channel(run.id),
            lambda message: message.get("type") == "status",
            args,
        )

    @requires("runs:control")
    @blp.response(204)
    def delete(self, run_id):
        """Delete an ended run and its log (409 while it is active)."""
        runs.delete_run(run_for(run_id, "developer"))


@blp.route("/<int:run_id>/log")
class RunLog(MethodView):
    @requires("projects:read")
    @blp.arguments(LogQuerySchema, location="query")
    @blp.response(200, LogPageSchema)
    def get(self, args, run_id):
        """A byte range of the log; page with `next_offset`."""
        run = run_for(run_id)
        data, next_offset = logs.read(run, args["offset"], args["limit"])
        return {
            "offset": args["offset"],
            "next_offset": next_offset,
            "size": run.log_size,
            "text": data.decode("utf-8", "replace"),
            "complete": run.status in RUN_TERMINAL and next_offset >= run.log_size,
        }

    @requires("runs:start")
    @blp.arguments(LogAppendSchema)
    @blp.response(200, LogAppendResponseSchema)
    @blp.doc(operationId="appendRunLog")
    def post(self, data, run_id):
        """Append to the log of a run I execute (external executors). Resending bytes already
        stored is harmless; a gap is 409 with `expected_offset`."""
        run = _held(run_for(run_id, "developer"), data["executor"])
        raw = data["text"].encode()
        appended = runs.append_log(run, data["offset"], raw)
        if appended is not None:
            pubsub.run_log(run.id, appended.offset, appended.data)
        return {"size": run.log_size, "stored": len(appended.data) if appended else 0}


@blp.route("/<int:run_id>/stream")
class RunStream(MethodView):
    @stream_view
    @requires("projects:read")
    def get(self, run_id):
        """Follow a run live: `log` (offset, text), `event` (telemetry), `status`, and `done`
        when it has ended. Ids are `<log bytes>-<event seq>`."""
        run_for(run_id)
        follower = RunFollower(run_id, last_event_id())
        follower.parking = parking()
        return sse(iter(follower), lambda: run_for(run_id))


@blp.route("/<int:run_id>/events")
class RunEvents(MethodView):
    @requires("projects:read")
    @blp.arguments(EventQuerySchema, location="query")
    @blp.response(200, EventPageSchema)
    def get(self, args, run_id):
        """Typed telemetry (init, assistant_text, tool_use, command, file_changed, result...),
        in order; page with `?after=<last seq>`."""
        run = run_for(run_id)
        rows, next_seq = runs.list_events(
            run, after_seq=args.get("after"), limit=args["limit"], kind=args.get("type")
        )
        return {"data": rows, "meta": {"next_after": next_seq}}

    @run_scoped
    @requires("runs:report")
    @blp.arguments(EventReportSchema)
    @blp.response(201, EventSchema)
    @blp.doc(operationId="appendRunEvents")
    def post(self, data, run_id):
        """Report an event on an active run (developer, or the run's own token: how an agent
        tells Switchboard what it does). The project's secret values in it are masked."""
        run = run_for(run_id, "developer")
        return runs.report_event(run, data["type"], data["data"]), 201


@blp.route("/<int:run_id>/stop")
class RunStop(MethodView):
    @requires("runs:control")
    @blp.response(202, RunSchema)
    def post(self, run_id):
        """Stop a run: TERM, a grace period, then KILL; it ends `cancelled`."""
        return runs.request_stop(run_for(run_id, "developer"))


def _held(run, executor: str):  # type: ignore[no-untyped-def]
    return runs.held(run, executor, current_app.config["SWITCHBOARD_LEASE_SECONDS"])


@blp.route("/<int:run_id>/heartbeat")
class RunHeartbeat(MethodView):
    @requires("runs:start")
    @blp.arguments(ExecutorSchema)
    @blp.response(200, HeartbeatResponseSchema)
    @blp.doc(operationId="sendRunHeartbeat")
    def post(self, data, run_id):
        """Renew the lease of a run I execute; says whether a stop was requested."""
        run = _held(run_for(run_id, "developer"), data["executor"])
        ours, stop = runs.renew_lease(
            run.id, data["executor"], current_app.config["SWITCHBOARD_LEASE_SECONDS"]
        )
        if not ours:
            raise Conflict(f"Run {run.id} is no longer held by {data['executor']!r}.")
        db.session.refresh(run)
        return {"lease_expires_at": run.lease_expires_at, "stop_requested": stop}


@blp.route("/<int:run_id>/complete")
class RunComplete(MethodView):
    @requires("runs:start")
    @blp.arguments(CompleteSchema)
    @blp.response(200, RunSchema)
    def post(self, data, run_id):
        """Report the end of a run I execute."""
        run = run_for(run_id, "developer")
        if run.executor != data["executor"]:
            raise Conflict(f"Run {run.id} is not held by {data['executor']!r}.")
        if run.status in RUN_TERMINAL:
            raise Conflict(f"Run {run.id} already ended ({run.status}).")
        return runs.finish(
            run.id,
            data["status"],
            exit_code=data["exit_code"],
            summary=data["summary"],
            executor=data["executor"],
        )

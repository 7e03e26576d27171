from flask import current_app, request
from flask.views import MethodView

from app.auth.guard import current_principal, requires, run_scoped
from app.extensions import Blueprint
from app.live import pubsub
from app.live.sse import last_event_id, sse, stream_view
from app.live.waiting import WaitQuerySchema, conditional, wait_for_change
from app.runs.schemas import RunSchema
from app.runs.stream import follow_task
from app.tasks import lifecycle, service
from app.tasks.schemas import (
    ClaimSchema,
    TaskCreateSchema,
    TaskDetailSchema,
    TaskPageSchema,
    TaskQuerySchema,
    TaskSchema,
    TaskUpdateSchema,
)

blp = Blueprint(
    "tasks",
    __name__,
    url_prefix="/api/v1/tasks",
    description="Tasks: what someone asked an agent to do",
)


def view(task, with_runs: bool = False):  # type: ignore[no-untyped-def]
    """The task with its derived fields (queue position, dependencies, runs)."""
    task.queue_position = lifecycle.queue_position(task)
    if "depends_on" not in task.__dict__:
        task.depends_on = service.dependency_ids(task.id)
    if with_runs:
        task.runs = service.task_runs(task.id)
    return task


@blp.route("")
class Tasks(MethodView):
    @requires("projects:read")
    @blp.arguments(TaskQuerySchema, location="query")
    @blp.response(200, TaskPageSchema)
    def get(self, args):
        """Tasks of the projects I can see, newest first."""
        page = service.list_tasks(
            current_principal(),
            project=args.get("project"),
            status=args.get("status"),
            agent=args.get("agent"),
            priority=args.get("priority"),
            creator_id=args.get("creator"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        )
        # the derived fields of a whole page in two queries, not two per task
        positions = lifecycle.queue_positions(page.items)
        dependencies = service.dependency_ids_of([t.id for t in page.items])
        for t in page.items:
            t.queue_position = positions.get(t.id)
            t.depends_on = dependencies[t.id]
        return page.response()

    @requires(service.CREATE_ABILITY)
    @blp.arguments(TaskCreateSchema)
    @blp.response(201, TaskSchema)
    @blp.doc(
        parameters=[
            {
                "in": "header",
                "name": "Idempotency-Key",
                "required": False,
                "schema": {"type": "string", "maxLength": 200},
                "description": "the same key within 24 h returns the same task",
            }
        ]
    )
    def post(self, data):
        """Create a task (developer): `queued` with its queue position, or `blocked` on its
        dependencies."""
        key = request.headers.get("Idempotency-Key", "").strip()[:200] or None
        created = service.create_task(current_principal(), data, key)
        headers = {"Location": f"/api/v1/tasks/{created.task.id}"}
        if created.replayed:
            headers["Idempotent-Replayed"] = "true"
        return view(created.task), 201, headers


@blp.route("/<int:task_id>")
class TaskById(MethodView):
    @run_scoped
    @requires("projects:read")
    @conditional
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, TaskDetailSchema)
    @blp.alt_response(304, description="Not Modified: the task is as the `If-None-Match` ETag")
    def get(self, args, task_id):
        """A task with its runs.

        With `?wait=`, answers when the task changes (long-poll); an `ETag` comes with it, and
        `If-None-Match` gets `304 Not Modified` while it is current."""

        def load():  # type: ignore[no-untyped-def]
            return view(service.task_for(current_principal(), task_id), with_runs=True)

        def channel(task):  # type: ignore[no-untyped-def]
            """A task follows its latest run: the run's status messages (a retry's new run
            starts when the old one ends); a task with no run yet hears the activity feed."""
            if task.latest_run_id is not None:
                return pubsub.run_channel(task.latest_run_id)
            return pubsub.activity_channel()

        def concerns(message):  # type: ignore[no-untyped-def]
            if message.get("type") == "status":
                return True
            return (message.get("data") or {}).get("task_id") == task_id

        def dump(task):  # type: ignore[no-untyped-def]
            return TaskDetailSchema().dump(task)  # a schema only when waiting

        return wait_for_change(load, dump, channel, concerns, args)

    @requires("runs:start")
    @blp.arguments(TaskUpdateSchema)
    @blp.response(200, TaskSchema)
    def patch(self, data, task_id):
        """Change the title, priority or dependencies of a task that has not started."""
        task = service.task_for(current_principal(), task_id, "developer")
        return view(service.update_task(task, data))

    @requires("runs:control")
    @blp.response(204)
    def delete(self, task_id):
        """Delete a task and its runs (409 while a run is in progress)."""
        service.delete_task(service.task_for(current_principal(), task_id, "developer"))


@blp.route("/<int:task_id>/stream")
class TaskStream(MethodView):
    @stream_view
    @requires("projects:read")
    def get(self, task_id):
        """Follow every run of a task live (retries included); each event carries `run_id`,
        ids are `<run id>:<log bytes>-<seq>`; `done` when the task has ended."""
        service.task_for(current_principal(), task_id)
        return sse(
            follow_task(task_id, last_event_id()),
            lambda: service.task_for(current_principal(), task_id),
        )


@blp.route("/<int:task_id>/cancel")
class TaskCancel(MethodView):
    @requires("runs:control")
    @blp.response(202, TaskSchema)
    def post(self, task_id):
        """Cancel a task: a running agent is stopped (TERM, grace, KILL)."""
        task = service.task_for(current_principal(), task_id, "developer")
        return view(service.cancel_task(task))


@blp.route("/<int:task_id>/retry")
class TaskRetry(MethodView):
    @requires("runs:start")
    @blp.response(201, RunSchema)
    def post(self, task_id):
        """A new run of a failed, cancelled, timed-out or lost task (409 otherwise)."""
        run = service.retry_task(service.task_for(current_principal(), task_id, "developer"))
        return run, 201, {"Location": f"/api/v1/runs/{run.id}"}


@blp.route("/<int:task_id>/claim")
class TaskClaim(MethodView):
    @requires("runs:start")
    @blp.arguments(ClaimSchema)
    @blp.response(200, RunSchema)
    def post(self, data, task_id):
        """An external executor takes the task's run with a lease (409 if another holds it)."""
        task = service.task_for(current_principal(), task_id, "developer")
        return service.claim(
            task, data["executor"], current_app.config["SWITCHBOARD_LEASE_SECONDS"]
        )

from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.reviews import service
from app.reviews.schemas import (
    ApproveSchema,
    ChangedFilesSchema,
    DiffQuerySchema,
    DiffSchema,
    RejectSchema,
)
from app.runs import service as runs
from app.runs.schemas import RunSchema

blp = Blueprint(
    "reviews",
    __name__,
    url_prefix="/api/v1/runs",
    description="Reviews: a run's change, approved (and pushed) or turned down by a person",
)


def _run(run_id: int, role: str = "viewer"):  # type: ignore[no-untyped-def]
    return runs.run_for(current_principal(), run_id, role)


@blp.route("/<int:run_id>/diff")
class RunDiff(MethodView):
    @requires("projects:read")
    @blp.arguments(DiffQuerySchema, location="query")
    @blp.response(200, DiffSchema)
    @blp.doc(operationId="getRunDiff")
    def get(self, args, run_id):
        """What the run changed, as a unified diff against its base commit (captured when it
        ended; cut at 1 MiB with `truncated`). 404 with the reason for a run without one."""
        return service.change_of(_run(run_id), args.get("path"))


@blp.route("/<int:run_id>/files")
class RunFiles(MethodView):
    @requires("projects:read")
    @blp.response(200, ChangedFilesSchema)
    @blp.doc(operationId="listRunFiles")
    def get(self, run_id):
        """The files the run changed: path, status, additions, deletions, binary."""
        return {"data": runs.get_change(_run(run_id)).files}


@blp.route("/<int:run_id>/approve")
class RunApprove(MethodView):
    @requires("git:push")
    @blp.arguments(ApproveSchema)
    @blp.response(200, RunSchema)
    @blp.doc(operationId="approveRun")
    def post(self, data, run_id):
        """Approve the run's change (`git:push`, and the project's `review_role`). With `push`
        (default) its branch is pushed to the remote by a job (`review: approving`, then
        `approved` and the task `completed`; a failed push is `pending` again with
        `review_error`); `pull_request` opens one on GitHub after. 409 unless in review."""
        return service.approve(
            current_principal(),
            _run(run_id),
            comment=data["comment"],
            push=data["push"],
            pull_request=data["pull_request"],
        )


@blp.route("/<int:run_id>/reject")
class RunReject(MethodView):
    @requires("runs:control")
    @blp.arguments(RejectSchema)
    @blp.response(200, RunSchema)
    @blp.doc(operationId="rejectRun")
    def post(self, data, run_id):
        """Turn the run's change down (the project's `review_role`): the task fails with the
        comment, or with `retry` a new attempt starts whose prompt ends with it."""
        return service.reject(
            current_principal(), _run(run_id), comment=data["comment"], retry=data["retry"]
        )

from flask.views import MethodView

from app.auth.guard import current_principal, requires, run_scoped
from app.extensions import Blueprint
from app.live import pubsub
from app.live.waiting import conditional, wait_for_change
from app.projects import service as projects
from app.questions import service
from app.questions.schemas import (
    AnswerSchema,
    QuestionAskSchema,
    QuestionPageSchema,
    QuestionQuerySchema,
    QuestionSchema,
    QuestionWaitSchema,
)
from app.runs import service as runs

blp = Blueprint(
    "questions",
    __name__,
    url_prefix="/api/v1",
    description="Questions: agents ask, people answer; the run waits meanwhile",
)


def _run(run_id: int, role: str = "viewer"):  # type: ignore[no-untyped-def]
    return runs.run_for(current_principal(), run_id, role)


@blp.route("/runs/<int:run_id>/questions")
class RunQuestions(MethodView):
    @run_scoped
    @requires("runs:report")
    @blp.arguments(QuestionAskSchema)
    @blp.response(201, QuestionSchema)
    @blp.doc(operationId="askQuestion")
    def post(self, data, run_id):
        """Ask a person (the run's own token, as its agent does; or a developer): `confirm`
        (yes/no), `choice` (one of `options`) or `text`. The run and its task are `waiting`
        until it is answered; wait for the answer with `GET …/questions/{id}?wait=30`."""
        return service.ask(_run(run_id, "developer"), data), 201

    @run_scoped
    @requires("projects:read")
    @blp.arguments(QuestionQuerySchema, location="query")
    @blp.response(200, QuestionPageSchema)
    @blp.doc(operationId="listRunQuestions")
    def get(self, args, run_id):
        """The run's questions, newest first."""
        run = _run(run_id)
        return service.list_questions(
            None,
            status=args.get("status"),
            project_id=None,
            run_id=run.id,
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()


@blp.route("/runs/<int:run_id>/questions/<int:question_id>")
class RunQuestion(MethodView):
    @run_scoped
    @requires("projects:read")
    @conditional
    @blp.arguments(QuestionWaitSchema, location="query")
    @blp.response(200, QuestionSchema)
    @blp.alt_response(304, description="Not Modified: the question is as the ETag says")
    @blp.doc(operationId="getRunQuestion")
    def get(self, args, run_id, question_id):
        """A question of the run. With `?wait=` (long-poll), answers as soon as it is answered,
        expires or is cancelled (an agent blocks on it: `switchboard ask` does)."""
        run = _run(run_id)
        question = service.of_run(run, question_id)
        left = service.seconds_left(question)
        if left is not None and args.get("wait"):  # its expiry answers the wait too
            args = {**args, "wait": min(args["wait"], left + 0.05)}
        return wait_for_change(
            lambda: service.of_run(run, question_id),
            lambda q: {"status": q.status},
            lambda q: pubsub.run_channel(q.run_id),
            lambda message: (
                message.get("type") == "question"
                and message.get("question", {}).get("id") == question_id
            ),
            args,
        )


@blp.route("/questions")
class Questions(MethodView):
    @requires("projects:read")
    @blp.arguments(QuestionQuerySchema, location="query")
    @blp.response(200, QuestionPageSchema)
    @blp.doc(operationId="listQuestions")
    def get(self, args):
        """Questions of the projects I can see, newest first (`?status=pending`: what waits
        for someone)."""
        principal = current_principal()
        project_id = None
        if args.get("project"):
            project_id = projects.project_for(principal, args["project"]).id
        return service.list_questions(
            projects.visible_project_ids(principal),
            status=args.get("status"),
            project_id=project_id,
            run_id=args.get("run"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()


def _question(question_id: int):  # type: ignore[no-untyped-def]
    question = service.get(question_id)
    _run(question.run_id)  # 404 when its project is not mine to see
    return question


@blp.route("/questions/<int:question_id>")
class QuestionById(MethodView):
    @requires("projects:read")
    @blp.response(200, QuestionSchema)
    @blp.doc(operationId="getQuestion")
    def get(self, question_id):
        """A question."""
        return _question(question_id)


@blp.route("/questions/<int:question_id>/answer")
class QuestionAnswer(MethodView):
    @requires("runs:control")
    @blp.arguments(AnswerSchema)
    @blp.response(200, QuestionSchema)
    @blp.doc(operationId="answerQuestion")
    def post(self, data, question_id):
        """Answer (developer): `yes`/`no` for a confirm, one of the options for a choice, text
        for text. The run goes on. A question answered, expired or cancelled already is 409
        (saying by whom and what)."""
        return service.answer(current_principal(), _question(question_id), data["answer"])

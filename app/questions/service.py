"""Questions: an agent that is unsure asks, a person answers, the run waits meanwhile.

A run with a pending question is `waiting` (its task too): it keeps its executor, its lease and
its slot. It goes back to `running` when nothing is left to answer. A question past its
timeout expires (answered by its default, if it has one) the first time anyone looks at it,
or at the latest at the next maintenance sweep; a run that ends cancels its pending questions.
Every change is announced on the run's channel (streams, long-polls) and in the activity feed
(`question.asked`, `question.answered`, `question.expired`: streams and outbound webhooks).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from app.activity import service as activity
from app.auth.service import Principal
from app.database import after_commit, db
from app.errors import Conflict, NotFound, ValidationFailed
from app.live import pubsub
from app.pagination import Page, paginate
from app.projects import service as projects
from app.questions.models import CONFIRM, Question
from app.runs import service as runs
from app.runs.models import Run
from app.timeutil import utcnow

#: who may answer: a developer of the run's project
ANSWER_ROLE = "developer"
OPTIONS_MAX, OPTION_MAX, ANSWER_MAX = 20, 200, 10_000


def _valid_answer(kind: str, options: list[str] | None, value: Any) -> str | None:
    """The answer as stored, or None when it does not fit the question."""
    if not isinstance(value, str):
        return None
    if kind == "confirm":
        value = value.strip().lower()
        return value if value in CONFIRM else None
    if kind == "choice":
        return value if value in (options or []) else None
    return value if len(value) <= ANSWER_MAX else None


def ask(run: Run, data: dict[str, Any]) -> Question:
    """The run's agent asks (data as `QuestionAskSchema` loaded it)."""
    if run.status not in ("running", "waiting"):
        raise Conflict(
            f"Run {run.id} is {run.status}: only a running agent asks"
            + (
                " (it has not started yet; ask again in a moment)."
                if run.status in ("queued", "assigned")
                else "."
            ),
            run_status=run.status,
        )
    kind, options = data["kind"], data.get("options")
    if kind == "choice":
        if not options or len(options) < 2 or len(set(options)) != len(options):
            raise ValidationFailed("Bad options.", {"options": ["two or more distinct options"]})
    elif options:
        raise ValidationFailed("Bad options.", {"options": ["only a choice has options"]})
    default = data.get("default")
    if default is not None:
        default = _valid_answer(kind, options, default)
        if default is None:
            raise ValidationFailed("Bad default.", {"default": ["not a possible answer"]})
    now = utcnow()
    timeout = data.get("timeout_s")
    question = Question(
        run_id=run.id,
        task_id=run.task_id,
        project_id=run.project_id,
        kind=kind,
        prompt=data["prompt"],
        options=options,
        default=default,
        timeout_s=timeout,
        expires_at=now + timedelta(seconds=timeout) if timeout else None,
        status="pending",
        created_at=now,
    )
    db.session.add(question)
    db.session.flush()
    runs.set_waiting(run, True)
    _said(question, "question.asked")
    db.session.commit()
    return question


def get(question_id: int) -> Question:
    question = db.session.get(Question, question_id)
    if question is None:
        raise NotFound(f"No question {question_id}.")
    return settled(question)


def of_run(run: Run, question_id: int) -> Question:
    question = db.session.get(Question, question_id)
    if question is None or question.run_id != run.id:
        raise NotFound(f"No question {question_id} on run {run.id}.")
    return settled(question)


def seconds_left(question: Question) -> float | None:
    if question.status != "pending" or question.expires_at is None:
        return None
    return max(0.0, (question.expires_at - utcnow()).total_seconds())


def settled(question: Question) -> Question:
    """The question as it stands: one past its timeout is expired now (answered by its
    default), whoever looks first."""
    if question.status == "pending" and question.expires_at and question.expires_at <= utcnow():
        _close(question, "expired", question.default, None)
    return question


def answer(principal: Principal, question: Question, value: Any) -> Question:
    """A person answers; 409 when it was answered, expired or cancelled already."""
    run = runs.get_run(question.run_id, with_project=True)
    projects.authorize(principal, run.project, ANSWER_ROLE)
    settled(question)
    if question.status != "pending":
        raise _closed(question)
    stored = _valid_answer(question.kind, question.options, value)
    if stored is None:
        expected = {
            "confirm": "yes or no",
            "choice": "one of " + ", ".join(question.options or []),
            "text": f"text of at most {ANSWER_MAX} characters",
        }[question.kind]
        raise ValidationFailed("Not a possible answer.", {"answer": [expected]})
    if not _close(question, "answered", stored, principal):
        db.session.refresh(question)
        raise _closed(question)
    return question


def _closed(question: Question) -> Conflict:
    who = f" by {question.answered_by_name}" if question.answered_by_name else ""
    return Conflict(
        f"Question {question.id} is {question.status}{who} already.",
        question_status=question.status,
        answer=question.answer,
        answered_by=question.answered_by_name,
    )


def _close(question: Question, status: str, value: str | None, by: Principal | None) -> bool:
    """pending → `status`, once (a conditional update: two answers at once, one wins); the run
    goes on when nothing else waits to be answered."""
    values: dict[str, Any] = {"status": status, "answer": value, "answered_at": utcnow()}
    if by is not None:
        values.update(answered_by_id=by.user.id, answered_by_name=by.user.username)
    closed = db.session.execute(
        sa.update(Question)
        .where(Question.id == question.id, Question.status == "pending")
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if closed != 1:
        db.session.rollback()
        return False
    for key, val in values.items():
        setattr(question, key, val)
    if not _pending(question.run_id):
        run = db.session.get(Run, question.run_id)
        if run is not None:
            runs.set_waiting(run, False)
    _said(question, f"question.{status}")
    db.session.commit()
    return True


def _pending(run_id: int) -> bool:
    return bool(
        db.session.scalar(
            sa.select(sa.func.count())
            .select_from(Question)
            .where(Question.run_id == run_id, Question.status == "pending")
        )
    )


def _said(question: Question, kind: str) -> None:
    """The run's streams and waiters hear it; the activity feed (and webhooks) record it.
    Cancellation is said on the run's channel only: the run's end says the rest."""
    data = question.public()
    channel = pubsub.run_channel(question.run_id)
    after_commit(lambda: pubsub.publish(channel, {"type": "question", "question": data}))
    if kind != "question.cancelled":
        activity.record(question.project_id, kind, data)


def list_questions(
    project_ids: list[int] | None,
    *,
    status: str | None,
    project_id: int | None,
    run_id: int | None,
    cursor: int | None,
    limit: int,
) -> Page[Question]:
    stmt = sa.select(Question)
    if project_ids is not None:
        stmt = stmt.where(Question.project_id.in_(project_ids))
    if project_id is not None:
        stmt = stmt.where(Question.project_id == project_id)
    if run_id is not None:
        stmt = stmt.where(Question.run_id == run_id)
    if status is not None:
        stmt = stmt.where(Question.status == status)
    page = paginate(stmt, Question.id, cursor=cursor, limit=limit)
    for question in page.items:
        settled(question)
    return page


# -- listeners and the sweep -----------------------------------------------------------------------


def cancel_for(run: Run) -> None:
    """The run ended (in its transaction): nobody is left to read the answers."""
    rows = list(
        db.session.scalars(
            sa.select(Question).where(Question.run_id == run.id, Question.status == "pending")
        )
    )
    for question in rows:
        question.status = "cancelled"
        question.answered_at = utcnow()
        _said(question, "question.cancelled")


def pending_for_run_sql(run_id: str) -> str:
    """`cancel_for`'s interest: the run has a pending question."""
    return f"EXISTS (SELECT 1 FROM questions q WHERE q.run_id = {run_id} AND q.status = 'pending')"


def expire_due() -> int:
    """The sweep: questions past their timeout that nobody looked at."""
    due = list(
        db.session.scalars(
            sa.select(Question).where(Question.status == "pending", Question.expires_at <= utcnow())
        )
    )
    for question in due:
        settled(question)
    return len(due)

"""Live run streams: replay from the database, then follow Redis, without gaps or repeats.

A stream's position is `<log bytes sent>-<last event seq>`; it is the SSE id of every event, so
`Last-Event-ID` resumes exactly there. The stream subscribes to the run's channel before it reads
the database; live messages it already covered are skipped or trimmed, and a live message beyond
its position (output published before the database batch landed) sends it back to the database.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import sqlalchemy as sa

from app.database import db
from app.live import access, pubsub
from app.live.hub import Parking, hub
from app.live.sse import Event, ping_interval
from app.runs import logs
from app.runs.models import RUN_TERMINAL, Run, RunEvent
from app.tasks.models import TASK_TERMINAL, Task
from app.timeutil import rfc3339

LOG_PAGE = 64 * 1024
POSITION = re.compile(r"^(\d{1,18})-(\d{1,18})$")  # beyond: no such position
#: how long to wait for a database batch before re-reading it after a gap
GAP_WAIT = 0.02
#: live messages handled per wake-up at most
BATCH = 200
#: how soon after a replay to look at the database once more (a batch is written every 100 ms)
RECHECK_AFTER = 0.15
GAP, REPLAY = "gap", "replay"


def parse_position(value: str | None) -> tuple[int, int]:
    match = POSITION.match(value or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class RunFollower:
    """Follows one run from a position; yields Events (None for a heartbeat)."""

    def __init__(
        self,
        run_id: int,
        position: str | None,
        *,
        final_done: bool = True,
        tag: dict | None = None,
        id_prefix: str = "",
    ) -> None:
        self.run_id = run_id
        self.pos, self.seq = parse_position(position)
        self.final_done = final_done
        self.tag = tag or {}
        self.id_prefix = id_prefix
        self.status_sent: str | None = None
        #: set by the route when the hub may write to this stream's socket (see Parking)
        self.parking: Parking | None = None

    def _id(self) -> str:
        return f"{self.id_prefix}{self.pos}-{self.seq}"

    def _event(self, name: str, data: dict) -> Event:
        return Event(name, {**data, **self.tag}, self._id())

    def _replay(self) -> Iterator[Event] | None:
        """Everything the database has past our position. Returns whether the run is done."""
        run = db.session.get(Run, self.run_id, populate_existing=True)
        if run is None:
            self.finished = True
            return iter(())
        out: list[Event] = []
        while self.pos < run.log_size:
            data, nxt = logs.read(run, self.pos, LOG_PAGE)
            if nxt == self.pos:
                break
            start, self.pos = self.pos, nxt
            out.append(
                self._event("log", {"offset": start, "text": data.decode("utf-8", "replace")})
            )
        while self.seq < run.event_count:
            rows = list(
                db.session.scalars(
                    sa.select(RunEvent)
                    .where(RunEvent.run_id == run.id, RunEvent.seq > self.seq)
                    .order_by(RunEvent.seq)
                    .limit(500)
                )
            )
            if not rows:
                break
            for row in rows:
                self.seq = row.seq
                out.append(
                    self._event(
                        "event",
                        {
                            "seq": row.seq,
                            "type": row.type,
                            "data": row.data,
                            "created_at": rfc3339(row.created_at),
                        },
                    )
                )
        if run.status != self.status_sent:
            self.status_sent = run.status
            out.append(self._event("status", {"status": run.status, "exit_code": run.exit_code}))
        self.finished = (
            run.status in RUN_TERMINAL and self.pos >= run.log_size and self.seq >= run.event_count
        )
        self.final = {"status": run.status, "exit_code": run.exit_code}
        db.session.remove()
        return iter(out)

    def __iter__(self) -> Iterator[Event | bytes | None]:
        sub = hub().subscribe([pubsub.run_channel(self.run_id)])
        #: live messages kept across a trip to the database (the one that showed a gap, and
        #: those behind it): once the database has caught up they are trimmed or sent
        self.pending: list[dict] = []
        #: output published before we subscribed reaches the database a batch later: look
        #: there once more shortly after each replay that follows a start or a gap
        self.recheck = True
        try:
            while True:
                yield from self._replay()
                if self.finished:
                    if self.final_done:
                        yield self._event("done", self.final)
                    return
                yield from self._follow(sub)
        finally:
            sub.close()

    def _follow(self, sub) -> Iterator[Event | bytes | None]:  # type: ignore[no-untyped-def]
        """Live messages until one needs the database (a gap, or a status change). Messages
        that are already waiting are handled together and sent as one write: under load a
        stream wakes once for many lines instead of once per line."""
        ping = ping_interval()
        while True:
            if self.pending:
                batch, self.pending = self.pending, []
            elif self._may_park():
                if not sub.park(self, ping):
                    yield None  # idle for a ping interval: a heartbeat
                    continue
                msg = sub.get(timeout=0)
                if msg is None:
                    continue  # the hub handed the socket back with nothing to add
                batch = [msg, *sub.drain(BATCH)]
            else:
                msg = sub.get(timeout=RECHECK_AFTER if self.recheck else ping)
                if msg is None:
                    if self.recheck:
                        self.recheck = False
                        return
                    yield None
                    continue
                batch = [msg, *sub.drain(BATCH)]
            out: list[bytes] = []
            for i, item in enumerate(batch):
                verdict = self._handle(item, out)
                if verdict == GAP:
                    self.pending = batch[i:]
                    self.recheck = True
                    time.sleep(GAP_WAIT)  # its batch is on the way to the database
                    break
                if verdict == REPLAY:
                    self.pending = batch[i + 1 :]
                    break
            if out:
                yield b"".join(out)
            if self.pending or verdict in (GAP, REPLAY):
                return

    def _may_park(self) -> bool:
        return self.parking is not None and not self.recheck and not self.tag and not self.id_prefix

    def _shared_frame(self, msg: dict, offset: int, size: int) -> bytes:
        """The log frame every subscriber at this position sends: encoded once per message."""
        cache = msg.setdefault("_sse", {})
        frame = cache.get(self.seq)
        if frame is None:
            frame = cache[self.seq] = Event(
                "log", {"offset": offset, "text": msg["text"]}, f"{offset + size}-{self.seq}"
            ).encode()
        return frame

    def _log_frame(self, start: int, raw: bytes) -> bytes:
        return self._event(
            "log", {"offset": start, "text": raw.decode("utf-8", "replace")}
        ).encode()

    def _event_frame(self, item: dict) -> bytes:
        return self._event(
            "event", {"seq": item["seq"], "type": item["type"], "data": item["data"]}
        ).encode()

    def continue_with(self, msg: dict) -> bytes | None:
        """For the hub, while this stream is parked: the frame that `msg` adds when it simply
        continues the log where the stream stands; None when the thread must decide."""
        if msg.get("type") != "log":
            return None
        offset, size = msg["offset"], msg.get("size", len(msg["text"].encode()))
        if offset != self.pos:
            return None
        frame = self._shared_frame(msg, offset, size)
        self.pos = offset + size
        return frame

    def _handle(self, msg: dict, out: list[bytes]) -> str | None:
        """Append the frames `msg` gives to `out`; GAP or REPLAY when the database must be
        read (GAP: `msg` itself is not covered yet)."""
        kind = msg.get("type")
        if kind == "log":
            offset, size = msg["offset"], msg.get("size", len(msg["text"].encode()))
            if offset + size <= self.pos:
                return None  # already sent from the database
            if offset > self.pos:
                return GAP
            # live output that continues our position: nothing was published unseen before
            # it, so the look at the database after a replay is not needed any more
            self.recheck = False
            if offset == self.pos and not self.tag and not self.id_prefix:
                # the common case, the same for every subscriber at this position:
                # encode once per message (and seq), not once per subscriber
                out.append(self._shared_frame(msg, offset, size))
                self.pos = offset + size
                return None
            raw = msg["text"].encode()[self.pos - offset :]
            start, self.pos = self.pos, offset + size
            out.append(self._log_frame(start, raw))
        elif kind == "events":
            for item in msg["events"]:
                if item["seq"] <= self.seq:
                    continue
                if item["seq"] != self.seq + 1:
                    return GAP
                self.seq = item["seq"]
                out.append(self._event_frame(item))
        elif kind == "question":  # asked, answered, expired: said live, kept by the API
            out.append(self._question_frame(msg["question"]))
        elif kind == "status":
            return REPLAY
        return None

    def _question_frame(self, question: dict) -> bytes:
        return self._event("question", question).encode()


class TerminalFollower(RunFollower):
    """A run's output as a terminal shows it: raw bytes, from `position` on, without its events
    (the live part yields the bytes themselves; the replay yields `log` Events, and `done`)."""

    def __init__(self, run_id: int, position: str) -> None:
        super().__init__(run_id, position)

    def _may_park(self) -> bool:
        return False

    def _shared_frame(self, msg: dict, offset: int, size: int) -> bytes:
        raw = msg.get("_raw")  # encoded once for every socket following the run
        if raw is None:
            raw = msg["_raw"] = msg["text"].encode()
        return raw

    def _log_frame(self, start: int, raw: bytes) -> bytes:
        return raw

    def _event_frame(self, item: dict) -> bytes:
        return b""

    def _question_frame(self, question: dict) -> bytes:
        return b""


TASK_POSITION = re.compile(r"^(\d{1,18}):(\d{1,18}-\d{1,18})$")


def follow_task(task_id: int, position: str | None) -> Iterator[Event | None]:
    """Every run of a task in order (retries included), each event tagged with its run id;
    ids are `<run id>:<log bytes>-<seq>`. Ends with `done` when the task has ended."""
    match = TASK_POSITION.match(position or "")
    after_run, run_pos = (int(match.group(1)), match.group(2)) if match else (0, None)
    ping = ping_interval()
    waited = 0.0
    while True:
        task = db.session.get(Task, task_id, populate_existing=True)
        if task is None:
            return
        run_ids = list(
            db.session.scalars(
                sa.select(Run.id)
                .where(Run.task_id == task_id, Run.id >= after_run)
                .order_by(Run.id)
            )
        )
        status, reason = task.status, task.status_reason
        db.session.remove()
        pending = [r for r in run_ids if r >= after_run]
        if pending:
            run_id = pending[0]
            start = run_pos if run_id == after_run else None
            yield from RunFollower(
                run_id, start, final_done=False, tag={"run_id": run_id}, id_prefix=f"{run_id}:"
            )
            after_run, run_pos = run_id + 1, None
            waited = 0.0
            continue
        if status in TASK_TERMINAL:
            yield Event(
                "done",
                {"status": status, "reason": reason},
                f"{max(after_run - 1, 0)}:0-0" if after_run else None,
            )
            return
        # between runs (queued, blocked): look again shortly
        time.sleep(0.2)
        waited += 0.2
        if waited >= ping or access.check_due():
            waited = 0.0
            yield None

"""The in-process event bus: services publish domain events, other modules listen.

A service that changes something says so here (`activity_recorded`, `task_ended`,
`project_capacity_changed`, …) instead of calling up into the modules that care, so no service
imports another to cause a side effect, and a new module (notifications, metrics, machines)
adds a listener without touching the publisher. Listeners run in the publisher's transaction:
what they write commits or rolls back with the change.

The PostgreSQL fast paths write a change in one hand-written statement and cannot run Python
listeners inside it. So a listener declares, next to its code, *when* it has work to do as an
SQL condition (`interest`); a fast path embeds `Event.listened_sql(...)` in its statement and
takes the ordinary path whenever it is true. Nothing that listens is ever skipped, and no fast
path restates who listens.

Built on blinker (Flask's own signals library): one named signal per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blinker import Namespace

_signals = Namespace()

#: An SQL condition on the columns the fast path names (e.g. {"project_id": "p.id"}): true when
#: the listener would act on the event for that row.
Interest = Callable[..., str]


class Event:
    """One kind of domain event, with the names its senders pass (documented per event)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc
        self._signal = _signals.signal(name, doc)
        self._interests: dict[Callable[..., Any], Interest] = {}
        self._adapters: dict[Callable[..., Any], Callable[..., Any]] = {}
        self._version = 0

    def connect(self, receiver: Callable[..., Any], *, interest: Interest | None = None) -> None:
        """Listen (once per receiver, however often a module is imported or an app created):
        `receiver(**data)`. `interest`: when it has work to do, as SQL; without it, always."""
        if receiver not in self._adapters:
            # blinker passes a sender first; our events have none, only their data
            self._adapters[receiver] = lambda _sender, **data: receiver(**data)
            self._signal.connect(self._adapters[receiver], weak=False)
        self._interests[receiver] = interest or (lambda **_columns: "true")
        self._version += 1

    def disconnect(self, receiver: Callable[..., Any]) -> None:
        adapter = self._adapters.pop(receiver, None)
        if adapter is not None:
            self._signal.disconnect(adapter)
        self._interests.pop(receiver, None)
        self._version += 1

    def send(self, **data: Any) -> None:
        """Call every listener, in the order they connected, in the caller's transaction."""
        if self._interests:
            self._signal.send(self.name, **data)

    def listened_sql(self, **columns: str) -> str:
        """An SQL condition that is true when any listener would act on this event for the row
        whose columns are named (`"false"` when nothing listens): what a fast path asks."""
        conditions = [f"({interest(**columns)})" for interest in self._interests.values()]
        return " OR ".join(conditions) if conditions else "false"

    @property
    def version(self) -> int:
        """Changes when a listener connects or leaves: a cached statement that embeds
        `listened_sql` is built again."""
        return self._version


activity_recorded = Event(
    "activity-recorded",
    """An activity entry was added (kwargs: project_id, kind, data): the feed's row is in the
    session; outbound subscriptions turn it into deliveries.""",
)

task_ended = Event(
    "task-ended",
    """A task reached a terminal status (kwargs: task): a webhook's event may be complete.""",
)

run_ended = Event(
    "run-ended",
    """A run reached a terminal state (kwargs: run), in the transaction that ends it: what
    waited on the run ends with it (its pending questions are cancelled).""",
)

lease_expired = Event(
    "lease-expired",
    """A run's executor stopped renewing its lease and the run was marked lost (kwargs: run_id,
    executor): the executor's agent may still be running where it was left. The worker pool
    listens, to end the agents a dead worker left on its host.""",
)

machine_run_queued = Event(
    "machine-run-queued",
    """A run of a task that runs on machines (`machine:…`, `labels:…`) was queued (kwargs:
    run_id, committed): an eligible machine with a free slot may take it now, in the current
    transaction, or (`committed`: a creation's fast path wrote it) in one of its own.""",
)

run_stop_requested = Event(
    "run-stop-requested",
    """A person asked a held run to stop (kwargs: run): its executor is told (the worker pool
    hears the run's control channel; a machine, its own).""",
)

maintenance_sweep = Event(
    "maintenance-sweep",
    """The maintenance sweep begins (kwargs: none): a module with its own repairs does them now,
    committing its own transactions (machines: offers not taken go back, what waits is assigned,
    before expired leases are counted lost).""",
)

project_capacity_changed = Event(
    "project-capacity-changed",
    """A project's concurrency cap changed (kwargs: project_id): queued runs may fit now.""",
)

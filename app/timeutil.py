"""One notion of time for the whole API: aware UTC in Python, RFC 3339 with `Z` on the wire.

SQLite forgets time zones, so columns store naive UTC and hand back aware datetimes on both
databases; the `Timestamp` schema field renders them as `2026-11-26T10:00:00Z`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
import sqlalchemy as sa


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else naive_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def naive_utc(value: datetime) -> datetime:
    """What a UTCDateTime column stores (for statements written without the ORM)."""
    return as_utc(value).replace(tzinfo=None)


def rfc3339(value: datetime) -> str:
    text = as_utc(value).replace(tzinfo=None).isoformat()  # fraction only when there is one
    return (text.rstrip("0") if "." in text else text) + "Z"


class Timestamp(ma.fields.DateTime):
    """RFC 3339 UTC out; any ISO 8601 with a zone in (naive input is taken as UTC)."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else rfc3339(value)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        return as_utc(super()._deserialize(value, attr, data, **kwargs))

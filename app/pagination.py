"""Cursor pagination shared by every list endpoint.

A cursor is an opaque, URL-safe token holding the sort key of the last row returned, so pages stay
stable while rows are inserted (unlike offsets) and each page is one indexed range scan however deep
the client goes. Lists answer `{"data": [...], "meta": {"next_cursor": ...}}` plus a
`Link: <...>; rel="next"` header.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

import marshmallow as ma
import sqlalchemy as sa
from flask import request

from app.database import db
from app.extensions import QuerySchema
from app.input_bounds import MAX_BIGINT

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def encode_cursor(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> Any:
    try:
        padded = token + "=" * (-len(token) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc


class CursorField(ma.fields.String):
    """Decodes the opaque cursor into the last id seen; a tampered cursor is a 422. An empty
    one is the first page: clients that loop on `cursor={next_cursor or ""}` start with it."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int | None:
        if value == "":
            return None
        try:
            decoded = decode_cursor(str(value))
        except ValueError as exc:
            raise ma.ValidationError("Not a valid cursor.") from exc
        if not isinstance(decoded, int) or isinstance(decoded, bool) or abs(decoded) > MAX_BIGINT:
            raise ma.ValidationError("Not a valid cursor.")
        return decoded


class PageQuerySchema(QuerySchema):
    cursor = CursorField(metadata={"description": "`meta.next_cursor` of the previous page"})
    limit = ma.fields.Int(
        load_default=DEFAULT_LIMIT,
        validate=ma.validate.Range(1, MAX_LIMIT),
        metadata={"description": f"page size, at most {MAX_LIMIT}"},
    )


class PageMetaSchema(ma.Schema):
    next_cursor = ma.fields.Str(allow_none=True, required=True)


def page_schema(item_schema: type[ma.Schema], name: str) -> type[ma.Schema]:
    """A named `{data, meta}` envelope for one item schema (distinct names keep OpenAPI sane)."""
    return type(
        name,
        (ma.Schema,),
        {
            "data": ma.fields.List(ma.fields.Nested(item_schema), required=True),
            "meta": ma.fields.Nested(PageMetaSchema, required=True),
        },
    )


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None

    def response(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Body, status and the `Link` header for a flask-smorest view to return."""
        headers: dict[str, str] = {}
        if self.next_cursor:
            args = request.args.to_dict(flat=True)
            args["cursor"] = self.next_cursor
            headers["Link"] = f'<{request.base_url}?{urlencode(args)}>; rel="next"'
        return {"data": self.items, "meta": {"next_cursor": self.next_cursor}}, 200, headers


def paginate(
    stmt: sa.Select[Any],
    id_column: Any,
    *,
    cursor: int | None,
    limit: int,
    newest_first: bool = True,
) -> Page[Any]:
    """Keyset pagination on a unique integer column (the primary key)."""
    if cursor is not None:
        stmt = stmt.where(id_column < cursor if newest_first else id_column > cursor)
    stmt = stmt.order_by(id_column.desc() if newest_first else id_column.asc()).limit(limit + 1)
    rows = list(db.session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(getattr(rows[-1], id_column.key)) if more and rows else None
    return Page(rows, next_cursor)

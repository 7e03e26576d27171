"""Input the database cannot hold is the client's error (404 or 422), never a 500 from the
driver: ids beyond PostgreSQL's `integer` (every id column), and text with NUL characters
(PostgreSQL's text holds no U+0000). SQLite would take both; refusing them everywhere keeps the
two backends alike."""

from __future__ import annotations

import json
import re
from typing import Any

import marshmallow as ma
from flask import Flask, Request
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import NotFound
from werkzeug.routing import IntegerConverter, Map, UnicodeConverter

MAX_ID = 2**31 - 1  # PostgreSQL `integer`: every id, and counts such as exit codes
MIN_INT = -(2**31)
MAX_BIGINT = 2**63 - 1  # byte offsets into a run's log
NUL = "\x00"
NUL_MESSAGE = "must not contain NUL (U+0000) characters"


#: how deep JSON bodies may nest (Python's parser recurses: 10,000 levels raise RecursionError)
JSON_DEPTH_MAX = 64
#: digits of a JSON number (Python refuses to convert integers of more than 4,300)
NUMBER_DIGITS_MAX = 100
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_LONG_NUMBER = re.compile(r"\d{" + str(NUMBER_DIGITS_MAX + 1) + ",}")
_CONSTANT = re.compile(r"NaN|Infinity")
_BRACKET = re.compile(r"[\[\]{}]")
#: a `\uD800`-`\uDBFF` escape not followed by a low one, or a low one not preceded by a high one
_LONE_SURROGATE = re.compile(
    r"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\)(?:\\\\)*(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def json_refusal(raw: bytes | str) -> str | None:
    """Why a JSON body is refused before any parser sees it, or None: nesting deeper than
    `JSON_DEPTH_MAX`, `NaN`/`Infinity` (not JSON, and echoed back as invalid JSON), numbers of
    more than `NUMBER_DIGITS_MAX` digits, lone UTF-16 surrogates (no text column holds them).
    Every way a body reaches a parser asks here: the request hooks, the task and webhook fast
    paths, the webhook receiver."""
    try:
        text = raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw
    except (UnicodeDecodeError, LookupError):
        return "the body is not valid UTF-8 JSON"
    if "\\u" in text and _LONE_SURROGATE.search(text):
        return "a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF without its pair)"
    bare = _STRING.sub('""', text) if '"' in text else text
    if _CONSTANT.search(bare):
        return "NaN and Infinity are not JSON"
    if _LONG_NUMBER.search(bare):
        return f"a number has more than {NUMBER_DIGITS_MAX} digits"
    if bare.count("[") + bare.count("{") > JSON_DEPTH_MAX:
        depth = 0
        for match in _BRACKET.finditer(bare):
            depth += 1 if match.group() in "[{" else -1
            if depth > JSON_DEPTH_MAX:
                return f"the JSON nests deeper than {JSON_DEPTH_MAX} levels"
    return None


def loads(raw: bytes | str) -> Any:
    """`json.loads` of a body that `json_refusal` accepts; ValueError otherwise."""
    refused = json_refusal(raw)
    if refused:
        raise ValueError(refused)
    return json.loads(raw)


def Id(**kwargs: Any) -> ma.fields.Int:
    """An id given in a body or a query string."""
    return ma.fields.Int(validate=ma.validate.Range(1, MAX_ID), **kwargs)


class NoSuchId(NotFound):
    """A path id no row can have: answered as a 404 with its own detail."""


class IdConverter(IntegerConverter):
    """`<int:…>` in every route: an id beyond MAX_ID is a 404 (no such row can exist), not a
    database error. The OpenAPI spec documents the bounds (flask-smorest reads min and max)."""

    def __init__(
        self,
        map: Map,
        fixed_digits: int = 0,
        min: int | None = 0,
        max: int | None = MAX_ID,
        signed: bool = False,
    ) -> None:
        super().__init__(map, fixed_digits, min, max, signed)

    def to_python(self, value: str) -> int:
        number = int(value)  # the converter's regex admits digits only
        if self.max is not None and number > self.max:
            raise NoSuchId(f"No resource has the id {value}: ids go up to {self.max}.")
        return number


class TextConverter(UnicodeConverter):
    """Path segments (project keys, webhook source names) with a NUL: nothing is named so."""

    def to_python(self, value: str) -> str:
        if NUL in value:
            raise NoSuchId("No resource has a name with a NUL character.")
        return value


def nul_paths(data: Any, path: str = "") -> list[str]:
    """Where strings (values or keys) in parsed JSON hold a NUL, as dotted field paths."""
    if isinstance(data, str):
        return [path or "_schema"] if NUL in data else []
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = json.dumps(key)[1:-1] if isinstance(key, str) else str(key)
            where = f"{path}.{name}" if path else name
            if isinstance(key, str) and NUL in key:
                found.append(where)
            found += nul_paths(value, where)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += nul_paths(value, f"{path}.{index}" if path else str(index))
    return found


class RequestParser(FlaskParser):
    """webargs' parser, refusing NUL characters in JSON bodies and query strings before the
    schema loads them, but in fields stored as bytes (`metadata={"nul": True}`: log text)."""

    def pre_load(
        self, location_data: Any, *, schema: ma.Schema, req: Request, location: str
    ) -> Any:
        if location == "json":
            bytes_fields = {
                name for name, field in schema.fields.items() if field.metadata.get("nul")
            }
            found = [
                where
                for where in nul_paths(location_data)
                if where.split(".", 1)[0] not in bytes_fields
            ]
        elif location in ("query", "querystring"):
            found = sorted({key for key, value in req.args.items(multi=True) if NUL in value})
            found += sorted({json.dumps(key)[1:-1] for key in req.args if NUL in key})
        else:
            found = []
        if found:
            raise ma.ValidationError({where: [NUL_MESSAGE] for where in found})
        return location_data


def register_converters(app: Flask) -> None:
    """Before any route is added: rules take their converters when they are added."""
    app.url_map.converters["int"] = IdConverter
    app.url_map.converters["default"] = TextConverter
    app.url_map.converters["string"] = TextConverter

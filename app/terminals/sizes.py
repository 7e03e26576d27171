"""Terminal sizes: the default, and the ones people may ask for (no Flask: executors use it)."""

from __future__ import annotations

from typing import Any

#: a terminal's size when nobody said otherwise (columns, rows)
DEFAULT = (120, 40)
#: sizes people may ask for (a terminal of 0 rows, or of 60000, is a mistake or an attack)
COLS_RANGE, ROWS_RANGE = (2, 1000), (2, 500)


def valid(cols: Any, rows: Any) -> tuple[int, int] | None:
    """(cols, rows) when both are integers in range; else None."""
    if type(cols) is not int or type(rows) is not int:  # not bool, not float
        return None
    if not (COLS_RANGE[0] <= cols <= COLS_RANGE[1] and ROWS_RANGE[0] <= rows <= ROWS_RANGE[1]):
        return None
    return cols, rows

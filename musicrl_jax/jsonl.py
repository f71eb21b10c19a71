"""JSON Lines reading with errors that name the file and line (light: no ML imports, so the
listening server can use it)."""

from __future__ import annotations

import json
from typing import Any, Iterator

from musicrl_jax.errors import ConfigError


def read_objects(path: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) per non-blank line; `where` = 'path, line N' for error messages."""
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno}). "
                                  "Fix: one JSON object per line.") from err
            yield where, value

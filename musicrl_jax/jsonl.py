"""Line-oriented input files (JSON Lines; plain text, one item a line) read with errors that
name the file and line (light: no ML imports, so the listening server can use it)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from musicrl_jax.errors import ConfigError


def read_objects(path: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) per non-blank line; `where` = 'path, line N' for error messages."""
    with open(path) as f:
        for line_number, line in enumerate(_decoded(f, path), 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno}). "
                                  "Fix: one JSON object per line.") from err
            yield where, value


def read_lines(path: str, flag: str, items: str) -> list[str]:
    """The non-blank lines, stripped, of a text file the user named as `flag`, holding one of
    `items` (e.g. "caption") a line. A missing, binary or empty file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file. Fix: pass a text file with one "
                          f"{items} per line.")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in _decoded(f, f"{flag} {path}") if line.strip()]
    if not lines:
        raise ConfigError(f"{flag} {path} holds no {items}s (blank lines are skipped). Fix: "
                          f"write one {items} per line.")
    return lines


def _decoded(lines, where: str) -> Iterator[str]:
    try:
        yield from lines
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text ({err.reason}); perhaps a binary file. "
                          "Fix: pass a UTF-8 text file.") from err

"""Reading JSONL files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from rizzearch.errors import DataError


def read_jsonl(path: str | Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file (``text``: its contents, if
    already read). Raises ``DataError`` naming ``file:line`` for a line that is not valid JSON or not
    a JSON object, and naming the file when it is not UTF-8."""
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON (column {e.colno}: {e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj

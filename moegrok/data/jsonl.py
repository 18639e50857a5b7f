"""Line-numbered JSON Lines, so that every bad record is named by file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moegrok.store import as_path


@dataclass(frozen=True)
class InvalidJSON:
    """Stands in for the record of a line that is not JSON (or not UTF-8)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every non-blank line; `where` is "path:line". Lines are decoded one by
    one, so a line that is not UTF-8 spoils only itself."""
    with as_path(path).open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{line_number}", InvalidJSON(f"invalid UTF-8 at byte {e.start + 1} of the line")
                continue
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = InvalidJSON(f"invalid JSON ({e.msg})")
                yield f"{path}:{line_number}", record

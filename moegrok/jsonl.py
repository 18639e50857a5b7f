"""Line-numbered JSON Lines, so that every bad record is named by file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InvalidJSON:
    """Stands in for the record of a line that is not JSON."""

    reason: str

    def __str__(self) -> str:
        return f"invalid JSON ({self.reason})"


def jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every non-blank line; `where` is "path:line"."""
    with Path(path).open() as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = InvalidJSON(e.msg)
                yield f"{path}:{line_number}", record

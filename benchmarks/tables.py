"""Helpers shared by the benchmark scripts: a Markdown table for the README, JSON lines for results/."""

from __future__ import annotations

import json
from typing import Iterable, Sequence


def print_markdown(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a Markdown table (what the README shows)."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def append_jsonl(path: str | None, rows: Iterable[dict]) -> None:
    """Append ``rows`` to ``path`` as JSON lines (nothing when ``path`` is None)."""
    if not path:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

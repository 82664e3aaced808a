"""The data package's error: bad input, named by file (or URI), row group and column; and the
shape every error message of mbrec takes (`detailed`)."""
from __future__ import annotations

from typing import Sequence

SHOWN = 20  # details listed; the rest counted


class DataError(ValueError):
    """Bad input data; the message names the file and column at fault."""


def detailed(headline: str, details: Sequence[str], limit: int = SHOWN) -> str:
    """An error message a user reads top down: one short headline (what failed and what to do),
    then each detail on a line of its own (a mismatch, a file, a key), the first `limit` of them.
    The CLI prints the headline as the job's first error line; a rank's note to its peers keeps
    the headline only."""
    lines = [f"  - {d}" for d in list(details)[:limit]]
    if len(details) > limit:
        lines.append(f"  ... and {len(details) - limit} more")
    return "\n".join([headline, *lines])

"""What the three halves of the Anthropic translator share: the JSON alias and compact dumps."""

from __future__ import annotations

import json
from typing import Any

Json = dict[str, Any]


def dumps(obj: object) -> str:
    """Compact JSON, non-ASCII kept: the form every body and event of this translator is written in."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

"""One cached answer and what it was stored under."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Answer:
    """What a hit replays: the text and what the provider charged for it the first time."""

    content: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    micro_usd: int  # what the original answer cost; a hit saves this much

    def to_json(self) -> str:
        return json.dumps([self.content, self.model, self.prompt_tokens, self.completion_tokens, self.micro_usd])

    @classmethod
    def from_json(cls, text: str | bytes) -> Answer:
        c, m, p, o, usd = json.loads(text)
        return cls(str(c), str(m), int(p), int(o), int(usd))


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    scope: str
    exact: str
    prompt: str
    vector: np.ndarray | None  # None: stored for the exact layer only
    answer: Answer
    created: float
    expires: float

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scope": self.scope, "exact": self.exact, "prompt": self.prompt,
                               "answer": self.answer.to_json(), "created": repr(self.created),
                               "expires": repr(self.expires)}
        if self.vector is not None:
            out["vector"] = self.vector.astype(np.float32).tobytes()
        return out

    @classmethod
    def from_fields(cls, entry_id: str, raw: dict[Any, Any]) -> Entry:
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

        def text(name: str) -> str:
            v = d[name]
            return v.decode() if isinstance(v, bytes) else str(v)

        vec = d.get("vector")
        vector = np.frombuffer(vec, dtype=np.float32).copy() if isinstance(vec, bytes) and vec else None
        return cls(entry_id, text("scope"), text("exact"), text("prompt"), vector, Answer.from_json(d["answer"]),
                   float(text("created")), float(text("expires")))

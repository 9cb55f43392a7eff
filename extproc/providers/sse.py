"""Server-sent events, incrementally: safe across arbitrary chunk boundaries.

``SSEParser.feed`` takes any piece of a byte stream and returns the events
completed by it; the unfinished tail is kept for the next piece. Lines may end
in LF, CRLF or CR. A CR ends its line at once; when it is the last byte of a
piece, an LF opening the next piece is taken as the rest of that CRLF, so an
event ended by CRs is delivered without waiting for bytes that may never come.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from extproc.errors import error_object


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    id: str | None = None


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_id", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False  # the previous piece ended in CR: a leading LF completes that CRLF
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    @property
    def pending(self) -> bool:
        """True when a partial line or an unterminated event is held."""
        return bool(self._buf) or bool(self._data) or self._event is not None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not self._buf and not self._data and self._event is None and not self._skip_lf:
            whole = self._whole_data_events(chunk)
            if whole is not None:
                return whole
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf != -1 else n)
            if cr != -1:
                end, nxt = cr, (cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1)
                if cr == n - 1:
                    self._skip_lf = True  # an LF may open the next piece
            elif lf != -1:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(buf[start:end], events)
            start = nxt
        self._buf = buf[start:]
        return events

    def _whole_data_events(self, chunk: bytes) -> list[SSEEvent] | None:
        """The events of a piece made only of whole one-line ``data: `` events (LF endings); None otherwise.

        That is how OpenAI-schema providers write a stream, one flush per
        event, so most pieces take this path: one split instead of a scan
        line by line. Anything else (a partial event, CRs, ``event:``/``id:``
        fields, comments, data over several lines) goes through the line
        parser, which gives the same events.
        """
        if not chunk.endswith(b"\n\n") or b"\r" in chunk:
            return None
        parts = chunk.split(b"\n\n")
        parts.pop()  # the empty tail after the last blank line
        events: list[SSEEvent] = []
        for part in parts:
            if not part.startswith(b"data: ") or b"\n" in part:
                return None
            events.append(SSEEvent(part[6:].decode("utf-8", "replace"), None, self._id))
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if not raw:
            if self._data or self._event is not None:
                events.append(SSEEvent("\n".join(self._data), self._event, self._id))
            self._data = []
            self._event = None
            return
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value


def encode(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def encode_json(obj: object, event: str | None = None) -> bytes:
    return encode(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), event)


def error_event(message: str, type: str = "api_error", code: str | None = "stream_interrupted") -> bytes:
    """The OpenAI-style error object sent in-band when a stream cannot finish."""
    return encode_json(error_object(message, type, code))


DONE = b"data: [DONE]\n\n"

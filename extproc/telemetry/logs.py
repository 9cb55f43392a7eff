"""Logging that never blocks the event loop.

Log records go onto an in-memory queue; one thread writes them out. A slow
terminal or a full pipe then delays log lines, never requests. Records are
formatted on the writer thread too, so the request path only builds the message.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys


def setup_logging(level: int = logging.INFO) -> logging.handlers.QueueListener:
    """Route the root logger through a queue; call ``.stop()`` on the result to flush at exit."""
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(q, writer, respect_handler_level=False)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_FastQueueHandler(q))
    root.setLevel(level)
    listener.start()
    return listener


class _FastQueueHandler(logging.handlers.QueueHandler):
    """Enqueue the record as it is; the writer thread formats it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

"""Specs for the incremental server-sent-events parser and encoder."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from extproc.providers import sse
from extproc.providers.sse import SSEEvent, SSEParser

# A stream in the shape real backends send: named events, a comment, multi-line
# data, an id, multi-byte UTF-8 text and a final [DONE].
RECORDED = (
    ": keep-alive comment\n"
    "\n"
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"msg_01"}}\n'
    "\n"
    "id: 7\n"
    'data: {"text":"Grüße aus Köln ☕ — 東京"}\n'
    "\n"
    "data: first line\n"
    "data:second line without a space\n"
    "data\n"
    "\n"
    "event: ping\n"
    'data: {"type": "ping"}\n'
    "\n"
    "data: [DONE]\n"
    "\n"
).encode()

RECORDED_EVENTS = [
    SSEEvent('{"type":"message_start","message":{"id":"msg_01"}}', "message_start", None),
    SSEEvent('{"text":"Grüße aus Köln ☕ — 東京"}', None, "7"),
    SSEEvent("first line\nsecond line without a space\n", None, "7"),
    SSEEvent('{"type": "ping"}', "ping", "7"),
    SSEEvent("[DONE]", None, "7"),
]


def feed_in_pieces(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    """Feed ``stream`` cut at the given offsets to one parser; all events, in order."""
    parser = SSEParser()
    bounds = [0, *sorted(cuts), len(stream)]
    events: list[SSEEvent] = []
    for start, end in itertools.pairwise(bounds):
        events.extend(parser.feed(stream[start:end]))
    assert not parser.pending
    return events


def with_line_endings(stream: bytes, ending: bytes) -> bytes:
    return stream.replace(b"\n", ending)


# --------------------------------------------------------------------------- line endings and fields


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_line_ending_yields_the_same_events(ending: bytes) -> None:
    assert SSEParser().feed(with_line_endings(RECORDED, ending)) == RECORDED_EVENTS


def test_line_endings_may_be_mixed_within_one_stream() -> None:
    stream = b"event: a\r\ndata: 1\r\rdata: 2\n\r\n"
    assert SSEParser().feed(stream) == [SSEEvent("1", "a"), SSEEvent("2")]


def test_data_lines_of_one_event_are_joined_with_newlines() -> None:
    assert SSEParser().feed(b"data: a\ndata: b\ndata: c\n\n") == [SSEEvent("a\nb\nc")]


def test_one_space_after_the_colon_is_dropped_and_further_spaces_kept() -> None:
    assert SSEParser().feed(b"data:  two spaces\n\n") == [SSEEvent(" two spaces")]


def test_comments_are_ignored_and_complete_no_event() -> None:
    parser = SSEParser()
    assert parser.feed(b": ping\n: another\n\n") == []
    assert not parser.pending


def test_an_event_name_applies_to_its_own_event_only() -> None:
    events = SSEParser().feed(b"event: delta\ndata: 1\n\ndata: 2\n\n")
    assert events == [SSEEvent("1", "delta"), SSEEvent("2", None)]


def test_the_last_event_id_carries_over_to_later_events() -> None:
    events = SSEParser().feed(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n")
    assert [e.id for e in events] == ["1", "1", "2"]


def test_unknown_fields_are_ignored() -> None:
    assert SSEParser().feed(b"retry: 10\nfoo: bar\ndata: x\n\n") == [SSEEvent("x")]


def test_blank_lines_without_fields_dispatch_nothing() -> None:
    assert SSEParser().feed(b"\n\n\r\n\r") == []


# --------------------------------------------------------------------------- arbitrary chunk boundaries


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_stream_split_in_two_at_any_byte_yields_the_same_events(ending: bytes) -> None:
    stream = with_line_endings(RECORDED, ending)
    for cut in range(len(stream) + 1):
        assert feed_in_pieces(stream, [cut]) == RECORDED_EVENTS, f"split at byte {cut}"


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_stream_fed_one_byte_at_a_time_yields_the_same_events(ending: bytes) -> None:
    stream = with_line_endings(RECORDED, ending)
    assert feed_in_pieces(stream, list(range(1, len(stream)))) == RECORDED_EVENTS


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_stream_split_at_random_points_yields_the_same_events(ending: bytes, seed: int) -> None:
    stream = with_line_endings(RECORDED, ending)
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(stream)), rng.randint(1, 40))
    assert feed_in_pieces(stream, cuts) == RECORDED_EVENTS


def test_a_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the rest of the CRLF, not a blank line
    assert parser.feed(b"\r\n") == [SSEEvent("a")]


def test_empty_pieces_change_nothing() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [SSEEvent("a")]


def test_an_event_ended_by_a_final_cr_is_delivered_without_waiting_for_more_bytes() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [SSEEvent("a")]
    assert not parser.pending


def test_multibyte_characters_split_across_pieces_decode_intact() -> None:
    stream = 'data: "☕ 東京"\n\n'.encode()
    first_multibyte = stream.index("☕".encode())
    parser = SSEParser()
    assert parser.feed(stream[: first_multibyte + 1]) == []
    assert parser.feed(stream[first_multibyte + 1 :]) == [SSEEvent('"☕ 東京"')]


# --------------------------------------------------------------------------- pending


def test_a_new_parser_holds_nothing() -> None:
    assert not SSEParser().pending


def test_pending_while_a_line_is_unfinished() -> None:
    parser = SSEParser()
    parser.feed(b"data: par")
    assert parser.pending


def test_pending_while_an_event_has_fields_but_no_blank_line_yet() -> None:
    parser = SSEParser()
    parser.feed(b"data: complete line\n")
    assert parser.pending
    parser.feed(b"\n")
    assert not parser.pending


def test_pending_after_an_event_name_alone() -> None:
    parser = SSEParser()
    parser.feed(b"event: message_stop\n")
    assert parser.pending


def test_not_pending_between_events() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2\n\n") == [SSEEvent("1"), SSEEvent("2")]
    assert not parser.pending


# --------------------------------------------------------------------------- encoding


def test_encoded_events_parse_back_to_themselves() -> None:
    wire = sse.encode("hello", "greeting") + sse.encode_json({"a": "ü", "b": [1, 2]}) + sse.DONE
    assert SSEParser().feed(wire) == [
        SSEEvent("hello", "greeting"),
        SSEEvent('{"a":"ü","b":[1,2]}'),
        SSEEvent("[DONE]"),
    ]


def test_error_event_carries_an_openai_error_object() -> None:
    (event,) = SSEParser().feed(sse.error_event("backend went away", "api_error", "stream_interrupted"))
    assert json.loads(event.data) == {
        "error": {"message": "backend went away", "type": "api_error", "param": None, "code": "stream_interrupted"}
    }


# --------------------------------------------------------------------------- whole events in one piece

# Pieces as providers flush them (whole events), and look-alikes that must still be read line by line.
WHOLE_PIECES = [
    b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
    b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n",
    b"data:  two spaces\n\n",
    'data: {"text":"Grüße ☕ 東京"}\n\n'.encode(),
    b"data: first\ndata: second\n\n",
    b"event: ping\ndata: {}\n\n",
    b": comment\n\ndata: x\n\n",
    b"data:no space\n\n",
    b"data: 1\r\n\r\n",
    b"data: 1\n\n\n\n",
    b"\n\n",
    b"data: \xff\xfe\n\n",
]


@pytest.mark.parametrize("piece", WHOLE_PIECES)
def test_a_piece_of_whole_events_reads_as_it_does_line_by_line(piece: bytes) -> None:
    one_at_a_time = feed_in_pieces(piece, list(range(1, len(piece))))  # never a whole event in one piece
    assert SSEParser().feed(piece) == one_at_a_time


def test_whole_events_after_an_id_carry_it() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 9\ndata: a\n\n") == [SSEEvent("a", None, "9")]
    assert parser.feed(b"data: b\n\n") == [SSEEvent("b", None, "9")]


def test_whole_events_after_a_partial_one_complete_it_first() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: par") == []
    assert parser.feed(b"tial\n\ndata: next\n\n") == [SSEEvent("partial"), SSEEvent("next")]

"""Tests for streamsvc.sse, named after the WHATWG event stream rules and examples.

Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html
(9.2.5 "Parsing an event stream", 9.2.6 "Interpreting an event stream").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc.sse import (
    ServerSentEvent,
    SSEDecoder,
    encode_comment,
    encode_event,
    encode_retry,
)

EOLS = pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"], ids=("LF", "CR", "CR+LF"))


def feed_all(parts: Iterable[bytes], decoder: SSEDecoder | None = None) -> list[ServerSentEvent]:
    decoder = decoder if decoder is not None else SSEDecoder()
    events: list[ServerSentEvent] = []
    for part in parts:
        events.extend(decoder.feed(part))
    return events


def decode(text: str, eol: str = "\n") -> list[ServerSentEvent]:
    """Decode ``text`` written with LF line ends, after swapping them for ``eol``."""
    return SSEDecoder().feed(text.replace("\n", eol).encode())


def normalize_line_ends(text: str) -> str:
    # SSE carries line breaks, not which kind they were: all come back as LF.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def spec_decode(stream: bytes) -> tuple[list[ServerSentEvent], str | None]:
    """The spec's algorithm transcribed literally over the whole stream at once.

    The reference that the incremental decoder is checked against.
    """
    text = stream.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff")
    # The last piece has no line end after it: an incomplete line, discarded at EOF.
    lines = re.split(r"\r\n|\r|\n", text)[:-1]
    events: list[ServerSentEvent] = []
    data_buffer, event_type, last_id, retry = "", "", None, None
    last_event_id: str | None = None
    for line in lines:
        if line == "":
            last_event_id = last_id
            if data_buffer == "":
                data_buffer, event_type, retry = "", "", None
                continue
            data_buffer = data_buffer.removesuffix("\n")
            events.append(ServerSentEvent(event_type or "message", data_buffer, last_id, retry))
            data_buffer, event_type, retry = "", "", None
        elif line.startswith(":"):
            continue
        else:
            if ":" in line:
                field, value = line.split(":", 1)
                value = value.removeprefix(" ")
            else:
                field, value = line, ""
            if field == "data":
                data_buffer += value + "\n"
            elif field == "event":
                event_type = value
            elif field == "id":
                if "\0" not in value:
                    last_id = value
            elif field == "retry" and value and all(c in "0123456789" for c in value):
                retry = int(value)
    return events, last_event_id


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- 9.2.6 examples ----------------------------------------------------------


@EOLS
def test_whatwg_example_stock_ticker_multiline_data(eol: str) -> None:
    # "data: YHOO / data: +2 / data: 10" dispatches one event with data "YHOO\n+2\n10".
    events = decode("data: YHOO\ndata: +2\ndata: 10\n\n", eol)
    assert events == [ServerSentEvent(data="YHOO\n+2\n10")]


@EOLS
def test_whatwg_example_comment_ids_and_leading_space(eol: str) -> None:
    stream = (
        ": test stream\n"
        "\n"
        "data: first event\n"
        "id: 1\n"
        "\n"
        "data:second event\n"
        "id\n"
        "\n"
        "data:  third event\n"
        "\n"
    )
    decoder = SSEDecoder()
    events = decoder.feed(stream.replace("\n", eol).encode())
    # The comment-only block fires nothing; "id" with no value resets the id
    # to ""; the third keeps one of its two leading spaces.
    assert events == [
        ServerSentEvent(data="first event", id="1"),
        ServerSentEvent(data="second event", id=""),
        ServerSentEvent(data=" third event", id=""),
    ]
    assert decoder.last_event_id == ""
    assert not decoder.pending


@EOLS
def test_whatwg_example_fields_without_colon(eol: str) -> None:
    decoder = SSEDecoder()
    events = decoder.feed("data\n\ndata\ndata\n\ndata:".replace("\n", eol).encode())
    # "data" with no colon is the field "data" with an empty value: the first
    # block fires "", the second fires "\n"; the last is discarded because no
    # blank line follows it.
    assert events == [ServerSentEvent(data=""), ServerSentEvent(data="\n")]
    assert decoder.pending


@EOLS
def test_whatwg_example_space_after_colon_is_optional(eol: str) -> None:
    events = decode("data:test\n\ndata: test\n\n", eol)
    assert events == [ServerSentEvent(data="test"), ServerSentEvent(data="test")]


@EOLS
def test_whatwg_example_last_event_needs_blank_line(eol: str) -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: first\n\ndata: second\n".replace("\n", eol).encode()) == [
        ServerSentEvent(data="first")
    ]
    # End of stream is not enough to dispatch: the caller sees `pending`.
    assert decoder.pending


@EOLS
def test_whatwg_intro_example_event_types(eol: str) -> None:
    stream = (
        "event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    )
    assert decode(stream, eol) == [
        ServerSentEvent(event="add", data="73857293"),
        ServerSentEvent(event="remove", data="2153"),
        ServerSentEvent(event="add", data="113411"),
    ]


# --- line ends -----------------------------------------------------------------


def test_line_ends_may_be_mixed() -> None:
    events = decode("data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r")
    assert events == [ServerSentEvent(data="a\nb\nc"), ServerSentEvent(data="d")]


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    # Regression: a CR ending a chunk must not make the LF starting the next
    # chunk an extra empty line (which would dispatch "a" early).
    events = feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [ServerSentEvent(data="a\nb")]


def test_cr_at_chunk_end_then_cr_is_two_line_ends() -> None:
    assert feed_all([b"data: a\r", b"\r"]) == [ServerSentEvent(data="a")]


def test_cr_at_chunk_end_survives_an_empty_chunk() -> None:
    assert feed_all([b"data: a\r", b"", b"\ndata: b\n\n"]) == [ServerSentEvent(data="a\nb")]


def test_crlf_split_after_a_split_utf8_sequence() -> None:
    events = feed_all([b"data: \xe4", b"\xb8\xad\r", b"\n\r", b"\n"])
    assert events == [ServerSentEvent(data="\u4e2d")]


@EOLS
@pytest.mark.parametrize(
    "char",
    ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"],
    ids=("LS", "PS", "NEL", "VT", "FF", "FS", "GS", "RS"),
)
def test_only_cr_and_lf_end_lines_not_unicode_line_separators(char: str, eol: str) -> None:
    # str.splitlines() would split on these; the spec does not.
    assert decode(f"data: a{char}b\n\n", eol) == [ServerSentEvent(data=f"a{char}b")]


# --- chunking ------------------------------------------------------------------

SPLIT_STREAM = (
    "\ufeff: 注释 comment\r\n"
    "id: 42\r\n"
    "event: 語\r"
    "data: 你好，世界 🌍\r\n"
    "data:  🚀x\n"
    "\r\n"
    "data: é👩‍👩‍👧\r"
    "\r"
    "data: tail"
).encode()
SPLIT_EXPECTED = [
    ServerSentEvent(event="語", data="你好，世界 🌍\n 🚀x", id="42"),
    ServerSentEvent(data="é👩‍👩‍👧", id="42"),
]


def test_split_stream_in_one_piece() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(SPLIT_STREAM) == SPLIT_EXPECTED
    assert decoder.pending


@pytest.mark.parametrize("cut", range(len(SPLIT_STREAM) + 1))
def test_split_in_two_at_every_byte(cut: int) -> None:
    decoder = SSEDecoder()
    assert feed_all([SPLIT_STREAM[:cut], SPLIT_STREAM[cut:]], decoder) == SPLIT_EXPECTED
    assert decoder.pending


def test_split_one_byte_at_a_time() -> None:
    decoder = SSEDecoder()
    parts = [SPLIT_STREAM[i : i + 1] for i in range(len(SPLIT_STREAM))]
    assert feed_all(parts, decoder) == SPLIT_EXPECTED
    assert decoder.pending
    assert feed_all([b"\n\n"], decoder) == [ServerSentEvent(data="tail", id="42")]
    assert not decoder.pending


def test_long_line_in_many_chunks() -> None:
    value = "x" * 100_000
    stream = f"data: {value}\n\n".encode()
    assert feed_all(split_at(stream, range(7, len(stream), 4096))) == [ServerSentEvent(data=value)]


def test_events_come_back_from_the_chunk_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\n") == [ServerSentEvent(data="1")]
    assert decoder.feed(b"\ndata: 3\n\n") == [ServerSentEvent(data="2"), ServerSentEvent(data="3")]
    assert decoder.feed(b"") == []


# --- BOM -----------------------------------------------------------------------


def test_bom_at_start_is_stripped() -> None:
    assert SSEDecoder().feed(b"\xef\xbb\xbfdata: 1\n\n") == [ServerSentEvent(data="1")]


def test_bom_split_across_chunks_is_stripped() -> None:
    assert feed_all([b"", b"\xef", b"\xbb", b"\xbf", b"data: 1\n\n"]) == [ServerSentEvent(data="1")]


def test_second_bom_is_not_stripped() -> None:
    # Only one leading BOM is ignored; the second is part of the field name
    # "\ufeffdata", an unknown field, so the first block fires nothing.
    stream = "\ufeff\ufeffdata: 1\n\ndata: 2\n\n".encode()
    assert SSEDecoder().feed(stream) == [ServerSentEvent(data="2")]


def test_bom_after_stream_start_is_not_stripped() -> None:
    stream = "data: 1\n\n\ufeffdata: 2\n\n".encode()
    assert SSEDecoder().feed(stream) == [ServerSentEvent(data="1")]


def test_bom_starting_a_later_chunk_is_not_stripped() -> None:
    assert feed_all([b"data: 1\n\n", "\ufeffdata: 2\n\n".encode()]) == [ServerSentEvent(data="1")]


def test_second_bom_in_its_own_chunk_is_not_stripped() -> None:
    assert feed_all([b"\xef\xbb\xbf", b"\xef\xbb\xbfdata: 1\n\n", b"data: 2\n\n"]) == [
        ServerSentEvent(data="2")
    ]


def test_bom_inside_data_is_kept() -> None:
    assert decode("data: \ufeffx\n\n") == [ServerSentEvent(data="\ufeffx")]


# --- field parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [": comment", ":", "::", ":data: x", ": id: 9", ": event: x"],
)
def test_comment_lines_are_ignored(line: str) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(f"{line}\ndata: a\n{line}\ndata: b\n\n{line}\n\n".encode()) == [
        ServerSentEvent(data="a\nb")
    ]
    assert decoder.last_event_id is None


@EOLS
def test_multiline_data_joined_with_lf(eol: str) -> None:
    assert decode("data: a\ndata:\ndata: b\ndata\n\n", eol) == [ServerSentEvent(data="a\n\nb\n")]


def test_data_without_colon_is_empty_value() -> None:
    assert decode("data\n\n") == [ServerSentEvent(data="")]


@pytest.mark.parametrize(
    ("line", "data"),
    [
        ("data:x", "x"),
        ("data: x", "x"),
        ("data:  x", " x"),
        ("data:   x  ", "  x  "),
        ("data: ", ""),
        ("data:  ", " "),
        ("data:\tx", "\tx"),
        ("data: a:b: c", "a:b: c"),
    ],
)
def test_only_one_space_after_colon_is_removed(line: str, data: str) -> None:
    assert decode(f"{line}\n\n") == [ServerSentEvent(data=data)]


@pytest.mark.parametrize("line", ["data : x", " data: x", "Data: x", "DATA: x", "datax: x"])
def test_field_names_are_exact(line: str) -> None:
    # "data " (space before the colon), " data", "Data" are unknown fields.
    assert decode(f"{line}\n\n") == []


def test_unknown_fields_are_ignored() -> None:
    stream = "foo: bar\ndata: a\nbaz\nx-custom: 1\n\nfoo: only\n\n"
    assert decode(stream) == [ServerSentEvent(data="a")]


def test_event_type_last_one_wins_and_order_in_block_does_not_matter() -> None:
    assert decode("data: x\nevent: a\nevent: b\n\n") == [ServerSentEvent(event="b", data="x")]


def test_event_type_resets_after_dispatch() -> None:
    assert decode("event: add\ndata: 1\n\ndata: 2\n\n") == [
        ServerSentEvent(event="add", data="1"),
        ServerSentEvent(event="message", data="2"),
    ]


def test_event_type_resets_after_data_less_block() -> None:
    assert decode("event: add\n\ndata: 2\n\n") == [ServerSentEvent(data="2")]


@pytest.mark.parametrize("line", ["event:", "event: ", "event"])
def test_empty_event_type_is_message(line: str) -> None:
    assert decode(f"{line}\ndata: x\n\n") == [ServerSentEvent(event="message", data="x")]


def test_data_less_block_dispatches_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: add\nid: 3\nretry: 10\nfoo: x\n\n") == []
    assert not decoder.pending


def test_blank_lines_alone_dispatch_nothing() -> None:
    assert decode("\n\n\n\n") == []


# --- id --------------------------------------------------------------------------


def test_id_is_none_until_the_stream_sends_one() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\n") == [ServerSentEvent(data="a", id=None)]
    assert decoder.last_event_id is None


def test_id_persists_across_events() -> None:
    stream = "id: 1\ndata: a\n\ndata: b\n\nevent: e\ndata: c\n\nid: 2\ndata: d\n\n"
    assert [e.id for e in decode(stream)] == ["1", "1", "1", "2"]


@pytest.mark.parametrize("bad_id", ["2\0", "\0", "a\0b"])
def test_id_with_nul_is_ignored(bad_id: str) -> None:
    stream = f"id: 1\ndata: a\n\nid: {bad_id}\ndata: b\n\n"
    assert [e.id for e in decode(stream)] == ["1", "1"]


@pytest.mark.parametrize("line", ["id:", "id: ", "id"])
def test_empty_id_resets_to_empty_string(line: str) -> None:
    decoder = SSEDecoder()
    events = decoder.feed(f"id: 1\ndata: a\n\n{line}\ndata: b\n\n".encode())
    assert [e.id for e in events] == ["1", ""]
    assert decoder.last_event_id == ""


def test_id_in_data_less_block_sets_last_event_id() -> None:
    # Dispatch sets the last event id before it checks the data buffer.
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\n\n") == []
    assert decoder.last_event_id == "7"
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent(data="x", id="7")]


def test_id_in_unterminated_block_does_not_set_last_event_id() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert decoder.last_event_id == "1"


def test_id_keeps_spaces_and_colons() -> None:
    assert decode("id:  a:b \ndata: x\n\n") == [ServerSentEvent(data="x", id=" a:b ")]


# --- retry -----------------------------------------------------------------------


def test_retry_digits_are_read() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 1000\ndata: a\n\ndata: b\n\n")
    # retry belongs to its own block; the stream's value stays on the decoder.
    assert events == [ServerSentEvent(data="a", retry=1000), ServerSentEvent(data="b")]
    assert decoder.retry == 1000


@pytest.mark.parametrize(
    "value",
    ["", " 100", "10a", "-1", "+1", "1.5", "1e3", "1 000", "\u0663", "\u00b2", "\uff11"],
    ids=repr,
)
def test_retry_ignored_unless_ascii_digits(value: str) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(f"retry: {value}\ndata: a\n\n".encode()) == [ServerSentEvent(data="a")]
    assert decoder.retry is None


def test_retry_only_block_sets_reconnection_time() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(encode_retry(2500)) == []
    assert decoder.retry == 2500


def test_invalid_retry_keeps_previous_value() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 300\n\nretry: soon\ndata: a\n\n")
    assert decoder.retry == 300


def test_retry_with_leading_zeros() -> None:
    assert decode("retry: 007\ndata: a\n\n") == [ServerSentEvent(data="a", retry=7)]


# --- pending ---------------------------------------------------------------------


def test_pending_false_on_a_new_decoder() -> None:
    assert not SSEDecoder().pending


def test_pending_for_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n")
    assert decoder.pending
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]
    assert not decoder.pending


def test_pending_for_a_partial_line() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\nda")
    assert decoder.pending


def test_pending_for_a_partial_utf8_sequence() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n\xe4")
    assert decoder.pending


def test_pending_false_after_a_comment() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n: ping\n")
    assert not decoder.pending


def test_pending_false_for_a_data_less_unterminated_block() -> None:
    # Such a block would dispatch nothing even if its blank line came, so
    # nothing is lost at EOF; `pending` tracks partial lines and data only.
    decoder = SSEDecoder()
    decoder.feed(b"event: done\nid: 3\n")
    assert not decoder.pending


# --- invalid UTF-8 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "data"),
    [
        (b"\xff", "\ufffd"),
        (b"a\xfe\xffb", "a\ufffd\ufffdb"),
        (b"\xe4\xb8", "\ufffd"),  # a truncated 3-byte sequence
        (b"\xc0\xaf", "\ufffd\ufffd"),  # an overlong "/"
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate
    ],
)
def test_invalid_utf8_is_replaced_not_raised(raw: bytes, data: str) -> None:
    stream = b"data: " + raw + b"\n\n"
    assert SSEDecoder().feed(stream) == [ServerSentEvent(data=data)]
    for cut in range(len(stream) + 1):
        assert feed_all([stream[:cut], stream[cut:]]) == [ServerSentEvent(data=data)]


# --- encoders ----------------------------------------------------------------------


def test_encode_event_data_only() -> None:
    assert encode_event("hello") == b"data: hello\n\n"


def test_encode_event_all_fields_in_order() -> None:
    assert encode_event("a\nb", event="delta", id="1", retry=5) == (
        b"id: 1\nevent: delta\nretry: 5\ndata: a\ndata: b\n\n"
    )


def test_encode_event_empty_data_writes_one_data_line() -> None:
    assert encode_event("") == b"data: \n\n"
    assert SSEDecoder().feed(encode_event("")) == [ServerSentEvent(data="")]


def test_encode_event_splits_on_every_line_end() -> None:
    assert encode_event("a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"


def test_encode_event_is_utf8() -> None:
    assert encode_event("中🚀", event="語") == "event: 語\ndata: 中🚀\n\n".encode()


def test_encode_event_empty_id_resets() -> None:
    decoder = SSEDecoder()
    events = feed_all([encode_event("a", id="1"), encode_event("b", id="")], decoder)
    assert [e.id for e in events] == ["1", ""]


ROUND_TRIP_TEXTS = [
    "plain",
    "  two leading spaces",
    " ",
    "",
    "\r",
    "\n",
    "\r\n",
    "\n\r",
    "a\n\nb",
    "\n\n\n",
    "trailing\n",
    "data: x",
    "id: 3",
    ": comment",
    "event: done",
    "retry: 10",
    "data: a\n\ndata: b\n\n",
    "你好，世界",
    "🚀👩‍👩‍👧🌍",
    "a\u2028b\x85c",
    "nul\0inside",
    "\ufeffbom",
    '{"choices":[{"delta":{"content":"hi\\n"}}]}',
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=repr)
def test_encode_event_round_trip(text: str) -> None:
    decoder = SSEDecoder()
    stream = encode_comment() + encode_event(text, event="delta", id="9") + encode_event(text)
    assert decoder.feed(stream) == [
        ServerSentEvent(event="delta", data=normalize_line_ends(text), id="9"),
        ServerSentEvent(data=normalize_line_ends(text), id="9"),
    ]
    assert not decoder.pending


def test_encode_event_round_trip_keeps_spaces_in_event_and_id() -> None:
    events = SSEDecoder().feed(encode_event("x", event="  sp ", id=" i d ", retry=0))
    assert events == [ServerSentEvent(event="  sp ", data="x", id=" i d ", retry=0)]


@pytest.mark.parametrize("bad_id", ["a\0", "a\r", "a\n", "\r\n"], ids=repr)
def test_encode_event_rejects_bad_id(bad_id: str) -> None:
    with pytest.raises(ValueError, match="id"):
        encode_event("x", id=bad_id)


@pytest.mark.parametrize("bad_event", ["a\r", "a\n", "a\r\nb"], ids=repr)
def test_encode_event_rejects_bad_event_type(bad_event: str) -> None:
    with pytest.raises(ValueError, match="event"):
        encode_event("x", event=bad_event)


def test_encode_event_rejects_negative_retry() -> None:
    with pytest.raises(ValueError, match="retry"):
        encode_event("x", retry=-1)


def test_encode_event_rejects_lone_surrogate() -> None:
    # UnicodeEncodeError is a ValueError: the caller's text was not valid Unicode.
    with pytest.raises(ValueError, match="surrogates not allowed"):
        encode_event("half an emoji \ud83d")


def test_encode_comment() -> None:
    assert encode_comment() == b": ping\n\n"
    assert encode_comment("") == b": \n\n"
    assert encode_comment("keep-alive 中") == ": keep-alive 中\n\n".encode()
    decoder = SSEDecoder()
    assert decoder.feed(encode_comment("data: x")) == []
    assert not decoder.pending


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "\r\n"], ids=repr)
def test_encode_comment_rejects_line_ends(bad: str) -> None:
    with pytest.raises(ValueError, match="comment"):
        encode_comment(bad)


def test_encode_retry() -> None:
    assert encode_retry(1000) == b"retry: 1000\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"
    with pytest.raises(ValueError, match="retry"):
        encode_retry(-1)


# --- properties ----------------------------------------------------------------------

# Plenty of CR, LF, spaces, colons and BOMs among arbitrary characters; no
# lone surrogates, which UTF-8 cannot carry (see test_encode_event_rejects_lone_surrogate).
chars = st.characters(exclude_categories=("Cs",))
texts = st.text(st.one_of(st.sampled_from("\r\n :\ufeff\0"), chars))
single_line = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"))
events_strategy = st.lists(
    st.tuples(
        texts,
        st.none() | single_line,
        st.none() | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0\r\n")),
        st.none() | st.integers(min_value=0, max_value=2**40),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(events=events_strategy, data=st.data())
def test_property_encode_then_decode_in_random_chunks(
    events: list[tuple[str, str | None, str | None, int | None]], data: st.DataObject
) -> None:
    stream = b"".join(
        encode_event(text, event=event, id=id_, retry=retry) for text, event, id_, retry in events
    )
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="cuts")
    decoder = SSEDecoder()
    decoded = feed_all(split_at(stream, cuts), decoder)

    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    for text, event, id_, retry in events:
        last_id = id_ if id_ is not None else last_id
        expected.append(
            ServerSentEvent(event or "message", normalize_line_ends(text), last_id, retry)
        )
    assert decoded == expected
    assert not decoder.pending
    assert decoder.last_event_id == last_id


# Fragments that make every rule fire: line ends, field names, BOMs, split
# and invalid UTF-8, NUL.
fragments = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b":", b" ", b"data", b"event", b"id", b"retry", b"x", b"12",
     b"\x00", b"\xef\xbb\xbf", b"\xe4\xb8\xad", b"\xe4", b"\xff", b"\xf0\x9f\x9a\x80"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(fragments, max_size=60), data=st.data())
def test_property_matches_literal_spec_algorithm_at_any_chunking(
    parts: list[bytes], data: st.DataObject
) -> None:
    assert_matches_spec(b"".join(parts), data, feed_all)


Feed = Callable[[Iterable[bytes], SSEDecoder], list[ServerSentEvent]]


def assert_matches_spec(stream: bytes, data: st.DataObject, feed: Feed) -> None:
    """``feed`` over ``stream`` cut at drawn places gives what the spec's algorithm gives."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    decoder = SSEDecoder()
    events = feed(split_at(stream, cuts), decoder)
    expected_events, expected_last_id = spec_decode(stream)
    assert events == expected_events
    assert decoder.last_event_id == expected_last_id


def feed_data_first(parts: Iterable[bytes], decoder: SSEDecoder) -> list[ServerSentEvent]:
    """As a chunk decoder reads: each part by ``feed_data`` when it takes it, else ``feed``."""
    events: list[ServerSentEvent] = []
    for part in parts:
        datas = decoder.feed_data(part)
        if datas is None:
            events.extend(decoder.feed(part))
        else:
            events.extend(ServerSentEvent("message", data.decode("utf-8", "replace"),
                                          decoder.last_event_id) for data in datas)
    return events


# The fast path's own shape among the rule-firing fragments, so that it fires often.
fast_fragments = st.one_of(fragments, st.sampled_from(
    [b"data: ", b"\n\n", b"data: x\n\n", b"data: {\"a\": 1}\n\ndata: [DONE]\n\n", b"id: 7\n"]))


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(fast_fragments, max_size=40), data=st.data())
def test_feed_data_fast_path_matches_the_spec_algorithm_at_any_chunking(
    parts: list[bytes], data: st.DataObject
) -> None:
    assert_matches_spec(b"".join(parts), data, feed_data_first)


def test_feed_data_takes_whole_data_only_events_and_refuses_the_rest() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_data(b"data: a\n\ndata:  b\n\n") == [b"a", b" b"]
    for other in (b"data: a\n", b"data: a\ndata: b\n\n", b"event: x\ndata: a\n\n",
                  b"data: a\r\n\r\n", b": ping\n\n", b"data: a\n\n\n"):
        assert decoder.feed_data(other) is None, other
    assert decoder.feed(b"data: par") == []
    assert decoder.feed_data(b"data: a\n\n") is None  # a partial line is held: feed() it
    assert [e.data for e in decoder.feed(b"tial\n\n")] == ["partial"]
    assert decoder.feed_data(b"data: a\n\n") == [b"a"]  # at rest again: taken
    assert decoder.feed(b"id: 7\n") == []
    # The id buffer is the id of every event after it, this one's too, as last_event_id says.
    assert decoder.feed_data(b"data: b\n\n") == [b"b"] and decoder.last_event_id == "7"
    assert decoder.feed(b"\xe2\x82") == []  # half a character is held
    assert decoder.feed_data(b"data: c\n\n") is None

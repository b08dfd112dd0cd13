"""The tests' SSE parser (tests/_sse.py) keeps to the rules a browser keeps to."""

from __future__ import annotations

from collections.abc import Iterator

from tests._sse import Event, events, lines


def test_fields_until_a_blank_line_make_an_event() -> None:
    body = (
        b": keep-alive\n\n"
        b"id: 1\nevent: message\ndata: {\ndata:  }\nretry: 5\n\n"
        b"data:x\n\n"  # no event field: "message"; no space after the colon
        b"event: done\ndata: {}\n\n"
    )
    assert list(events(body)) == [
        Event("message", "{\n }", "1"),  # only the first space after ':' goes
        Event("message", "x", "1"),  # the last id stays until another comes
        Event("done", "{}", "1"),
    ]


def test_an_event_the_stream_ends_before_its_blank_line_is_dropped() -> None:
    message = b"id: 1\nevent: message\ndata: {}\n\n"
    assert [e.event for e in events(message + b"event: done\ndata: {}\n\n")] == ["message", "done"]
    for cut in (b"event: done\ndata: {}\n", b"event: done\ndata: {}", b"event: done\n"):
        assert [e.event for e in events(message + cut)] == ["message"], cut


def test_crlf_cr_and_lf_all_end_lines_even_split_across_chunks() -> None:
    chunks = [b"\xef\xbb\xbfevent: a\r", b"\ndata: 1\r\r", b"event: b\ndata: \xc3", b"\xa9\r"]
    assert list(events(chunks)) == [Event("a", "1", "")]
    assert list(lines(chunks)) == ["event: a", "data: 1", "", "event: b", "data: é"]
    assert list(events([*chunks, b"\r"])) == [Event("a", "1", ""), Event("b", "é", "")]


def test_an_event_without_data_is_not_dispatched_but_an_empty_data_line_is() -> None:
    assert list(events(b"event: done\n\nid: 7\n\n")) == []
    assert list(events(b"event: done\ndata\n\n")) == [Event("done", "", "")]


def test_events_come_out_as_their_chunks_arrive() -> None:
    read: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        for chunk in (b"data: 1\n", b"\n", b"data: 2\n\n"):
            read.append(chunk)
            yield chunk

    stream = events(chunks())
    assert next(stream).data == "1" and read == [b"data: 1\n", b"\n"]
    assert next(stream).data == "2"

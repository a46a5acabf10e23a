"""The protocol and the framer as pure functions: no sockets, every rule of docs/PROTOCOL.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services import protocol
from services.protocol import answer, answer_batch
from services.session import LineFramer, Tally


def reply(line: bytes) -> bytes:
    return answer(line).reply


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"hello", b"HELLO\n"),
        (b"", b"\n"),
        (b"MiXeD 123 !?", b"MIXED 123 !?\n"),
        (b"caf\xc3\xa9 \x00 \xff z", b"CAF\xc3\xa9 \x00 \xff Z\n"),
        (b"/ping", b"PONG\n"),
        (b"/quit", b"BYE\n"),
        (b"//ping", b"/PING\n"),
        (b"//", b"/\n"),
        (b"/sleep 0", b"\n"),
        (b"/sleep 1 hi there", b"HI THERE\n"),
        (b"/sleep 0  two  spaces ", b" TWO  SPACES \n"),
        (b"/sleep 00001 x", b"X\n"),
        (b"/work 0 x", b"X\n"),
        (b"/work 100 abc", b"ABC\n"),
        (b"/work 10", b"\n"),
    ],
)
def test_replies_follow_the_protocol_byte_for_byte(line: bytes, expected: bytes) -> None:
    assert reply(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"/ping x",
        b"/ping ",
        b"/quit now",
        b"/sleep",
        b"/sleep ",
        b"/sleep x",
        b"/sleep -1",
        b"/sleep 60001",
        b"/sleep 1.5",
        b"/sleep +5",
        b"/sleep \xd9\xa3",
        b"/work",
        b"/work 10000001",
        b"/work 1e3",
        b"/sleep " + b"9" * 5000,
    ],
)
def test_bad_arguments_are_errors_that_keep_the_connection(line: bytes) -> None:
    result = answer(line)
    assert result.reply.startswith(b"ERR bad-argument ")
    assert result.reply.endswith(b"\n") and result.reply.count(b"\n") == 1
    assert result.error == "bad-argument"
    assert not result.close


@pytest.mark.parametrize("line", [b"/PING", b"/pingx", b"/", b"/ sleep 1", b"/echo hi", b"/Quit"])
def test_unknown_commands_are_errors_that_keep_the_connection(line: bytes) -> None:
    result = answer(line)
    assert result.reply.startswith(b"ERR unknown-command ")
    assert (result.command, result.error, result.close) == (
        protocol.UNKNOWN,
        "unknown-command",
        False,
    )


def test_range_limits_are_inclusive() -> None:
    # /sleep 60000 itself would sleep a minute: check the parser's boundary instead.
    assert protocol._parse_number(b"60000 x", protocol.MAX_SLEEP_MS) == (60000, b"x")
    assert answer(b"/work 10000000").error is None
    assert answer(b"/sleep 60001").error == "bad-argument"
    assert answer(b"/work 10000001").error == "bad-argument"


def test_quit_closes_and_a_batch_stops_after_it() -> None:
    answers = answer_batch([b"a", b"/quit", b"b"])
    assert [a.reply for a in answers] == [b"A\n", b"BYE\n"]
    assert answers[-1].close


def test_commands_are_classified_for_metrics() -> None:
    kinds = [answer(line).command for line in (b"x", b"/ping", b"/sleep 0", b"/work 0", b"/quit")]
    assert kinds == [protocol.ECHO, protocol.PING, protocol.SLEEP, protocol.WORK, protocol.QUIT]
    assert answer(b"/sleep z").command == protocol.SLEEP


@given(st.binary(max_size=300).filter(lambda b: b"\n" not in b and not b.startswith(b"/")))
def test_echo_uppercases_ascii_letters_only(line: bytes) -> None:
    expected = bytes(c - 32 if 97 <= c <= 122 else c for c in line) + b"\n"
    assert reply(line) == expected


@given(st.binary(max_size=200).filter(lambda b: b"\n" not in b))
def test_every_line_gets_exactly_one_reply_line(line: bytes) -> None:
    if line.startswith((b"/sleep ", b"/work ")):
        line = line.split(b" ", 1)[0] + b" x"  # keep property runs fast: no real sleeping
    result = answer(line)
    assert result.reply.endswith(b"\n") and result.reply.count(b"\n") == 1
    if result.error is not None:
        assert result.reply.startswith(b"ERR " + result.error.encode() + b" ")


# -- framing -----------------------------------------------------------------------------


def test_framer_splits_lines_across_reads_and_drops_cr() -> None:
    framer = LineFramer(100)
    assert framer.feed(b"ab") == ([], False)
    assert framer.feed(b"c\r\nde\n\r") == ([b"abc", b"de"], False)
    assert framer.feed(b"\n") == ([b""], False)


def test_framer_accepts_exactly_the_limit_with_cr_counted() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"abcd\n") == ([b"abcd"], False)
    assert framer.feed(b"abc\r\n") == ([b"abc"], False)
    assert framer.feed(b"abcd\r\n") == ([], True)


def test_framer_answers_lines_before_an_overlong_one_and_keeps_nothing() -> None:
    framer = LineFramer(4)
    lines, overflow = framer.feed(b"ok\nfine\ntoolong\nnever\n")
    assert (lines, overflow) == ([b"ok", b"fine"], True)
    assert framer.partial == b""


def test_framer_detects_an_overlong_partial_line_without_waiting_for_newline() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"12345678") == ([], False)  # exactly the limit: may still end here
    assert framer.feed(b"9") == ([], True)
    assert framer.partial == b""


@given(
    st.lists(st.binary(max_size=20).filter(lambda b: b"\n" not in b), max_size=20),
    st.integers(min_value=1, max_value=17),
)
def test_framer_reassembles_any_chunking(lines: list[bytes], chunk: int) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    framer = LineFramer(1000)
    seen: list[bytes] = []
    for start in range(0, len(stream), chunk):
        got, overflow = framer.feed(stream[start : start + chunk])
        assert not overflow
        seen.extend(got)
    assert seen == [line[:-1] if line.endswith(b"\r") else line for line in lines]


def test_tally_counts_requests_errors_and_durations() -> None:
    tally = Tally()
    tally.record(answer(b"x"), 0.00003)
    tally.record(answer(b"/nope"), 0.2)
    tally.count_error("line-too-long")
    assert tally.requests[protocol.ECHO * 2] == 1
    assert tally.requests[protocol.UNKNOWN * 2 + 1] == 1
    assert tally.errors == {"unknown-command": 1, "line-too-long": 1}
    assert sum(tally.durations[protocol.ECHO].counts) == 1
    total = Tally()
    total.add(tally)
    total.add(tally)
    assert total.requests[protocol.ECHO * 2] == 2 and total.errors["line-too-long"] == 2

"""The CLI's progress line: drawn on a terminal, silent otherwise."""

from __future__ import annotations

import io

from arrayckpt.progress import Progress, human_bytes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_a_bar_on_a_terminal_and_clears_it():
    out = Terminal()
    with Progress("verify", total=2048, stream=out) as bar:
        bar.advance(1024)
        bar.advance(1024)
    text = out.getvalue()
    assert "verify  [" in text and "100%" in text and "2.0 KiB / 2.0 KiB" in text
    assert text.endswith("\r\x1b[K")


def test_silent_when_not_a_terminal():
    out = io.StringIO()
    with Progress("verify", total=10, stream=out) as bar:
        bar.advance(10)
    assert out.getvalue() == ""


def test_without_a_total_it_shows_elapsed_time():
    out = Terminal()
    with Progress("consolidate", stream=out):
        pass
    assert "consolidate  0." in out.getvalue()


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]

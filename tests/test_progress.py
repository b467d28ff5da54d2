"""Tests for rlaif.progress: line formats on a TTY and in logs, rate limiting, ETA math."""

from __future__ import annotations

import io

import pytest

from rlaif.progress import Progress, format_duration, format_rate


class Clock:
    """A hand-driven clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float) -> None:
        self.t += seconds


def make(total=100, **kw):
    clock = Clock()
    out = io.StringIO()
    bar = Progress(total, "judge", stream=out, clock=clock, **kw)
    return bar, out, clock


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (float("nan"), "?"),
        (0, "0s"),
        (59.4, "59s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3600, "1h00m"),
        (11220, "3h07m"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rate():
    assert [format_rate(r) for r in (1234.5, 56.78, 0.4241)] == ["1234", "56.8", "0.42"]


def test_log_lines_every_ten_percent_or_five_seconds():
    bar, out, clock = make(tty=False)
    assert out.getvalue() == ""  # no noise at the start of a fresh stage
    clock.tick(1)
    bar.update(5)  # 5 %, 1 s: nothing yet
    assert out.getvalue() == ""
    clock.tick(1)
    bar.update(5)  # reaches 10 %
    assert out.getvalue() == "judge: 10/100 items (10.0%) | 5.00 items/s | ETA 18s\n"
    clock.tick(5)
    bar.update(1)  # 11 %, but 5 s passed
    assert out.getvalue().splitlines()[-1] == "judge: 11/100 items (11.0%) | 1.57 items/s | ETA 57s"
    clock.tick(0.1)
    bar.update(1)  # neither a new step nor 5 s
    assert len(out.getvalue().splitlines()) == 2
    clock.tick(0.9)
    bar.update(88)
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[-2].startswith("judge: 100/100 items (100.0%)")
    assert lines[-1] == "judge: 100/100 items (100.0%) done in 8s | 12.5 items/s"
    assert "\r" not in out.getvalue()


def test_tty_redraws_in_place_at_most_every_half_second():
    bar, out, clock = make(tty=True)
    assert out.getvalue() == "\rjudge: 0/100 items (0.0%) | ETA ?"
    start_len = len(out.getvalue())
    clock.tick(0.2)
    bar.update(10)
    assert len(out.getvalue()) == start_len  # too soon to redraw
    clock.tick(0.3)
    bar.update(10)
    drawn = out.getvalue()[start_len:]
    assert drawn == "\rjudge: 20/100 items (20.0%) | 40.0 items/s | ETA 2s"
    clock.tick(1.5)
    bar.update(80)
    with bar:
        pass
    final = out.getvalue().split("\r")[-1]
    assert final == "judge: 100/100 items (100.0%) done in 2s | 50.0 items/s\n"
    assert "\n" not in out.getvalue()[:-1]  # only the summary ends the line


def test_tty_pads_a_shorter_line_over_a_longer_one():
    bar, out, clock = make(total=None, tty=True)
    clock.tick(1)
    bar.update(123456, tokens=10**7)
    long_line = out.getvalue().split("\r")[-1]
    bar.desc = "j"
    clock.tick(1)
    bar.update(1)
    short = out.getvalue().split("\r")[-1]
    assert len(short) == len(long_line) and short.rstrip() == short.strip()
    assert short.startswith("j: 123457 items")


def test_tokens_per_second_and_unknown_total():
    bar, out, clock = make(total=None, tty=False, unit="calls")
    clock.tick(4)
    bar.update(8, tokens=2000)
    bar.close()
    assert out.getvalue() == "judge: 8 calls done in 4s | 2.00 calls/s | 500 tok/s\n"


def test_resumed_work_counts_as_done_but_not_in_the_rate():
    bar, out, clock = make(tty=False, initial=50)
    assert out.getvalue() == "judge: 50/100 items (50.0%) | ETA ? (resuming)\n"
    clock.tick(10)
    bar.update(10)  # 60 %: a new step
    assert bar.rate == pytest.approx(1.0)
    assert bar.eta == pytest.approx(40.0)
    assert out.getvalue().splitlines()[-1] == "judge: 60/100 items (60.0%) | 1.00 items/s | ETA 40s"
    bar.close()
    assert out.getvalue().splitlines()[-1] == (
        "judge: 60/100 items (60.0%) stopped in 10s | 1.00 items/s | 50 resumed"
    )


def test_eta_math():
    bar, _, clock = make(total=1000, quiet=True)
    assert bar.rate is None and bar.eta is None  # no time has passed
    clock.tick(20)
    bar.update(250)
    assert bar.rate == pytest.approx(12.5)
    assert bar.eta == pytest.approx(750 / 12.5)
    bar.update(800)  # past the total: nothing left
    assert bar.eta == 0


def test_quiet_prints_nothing():
    bar, out, clock = make(quiet=True, tty=True, initial=3)
    clock.tick(10)
    bar.update(97)
    bar.close()
    assert out.getvalue() == ""


def test_broken_stream_never_breaks_the_work():
    out = io.StringIO()
    bar = Progress(10, "x", stream=out, tty=False, interval=0)
    out.close()
    bar.update(5)
    bar.close()
    assert bar.n == 5


def test_detects_non_tty_stream():
    bar = Progress(10, "x", stream=io.StringIO())
    assert bar.tty is False and bar.interval == 5.0

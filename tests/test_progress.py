"""The progress printer: counts, rates, ETAs and throttling (pure, no Ray)."""

from __future__ import annotations

import io

from dp4tl_ray.progress import Progress, format_duration, format_line, say


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_durations_read_as_seconds_minutes_hours():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_line_shows_count_percent_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress("extract", total=1000, unit="rows", rate_unit="images/s", out=out, clock=clock)
    clock.t += 10
    line = p.update(250)
    # 250 rows in 10 s -> 25 images/s; 750 left -> 30 s
    assert line == "[extract] 250/1,000 rows (25%) | 25 images/s | ETA 30s"
    assert out.getvalue() == line + "\n"


def test_work_done_before_the_printer_does_not_count_in_the_rate():
    clock = Clock()
    p = Progress("extract", total=1000, unit="rows", rate_unit="images/s", start=600, out=io.StringIO(), clock=clock)
    clock.t += 4
    assert p.update(800) == "[extract] 800/1,000 rows (80%) | 50 images/s | ETA 4s"


def test_a_start_up_before_the_first_update_stays_out_of_the_rate_and_eta_when_asked():
    clock = Clock()
    p = Progress("extract", total=6000, unit="rows", rate_unit="images/s", start=3000, out=io.StringIO(),
                 clock=clock, rate_from_first=True)
    clock.t += 5  # the actors start: no rows yet
    assert p.update(3100) == "[extract] 3,100/6,000 rows (52%)"  # one point: no pace yet
    clock.t += 2
    # 1,000 rows in the 2 s since the first update -> 500 images/s; 1,900 left -> 4 s (counting the
    # start-up, 1,100 rows in 7 s would say 12 s)
    assert p.update(4100) == "[extract] 4,100/6,000 rows (68%) | 500 images/s | ETA 4s"
    clock.t += 5
    # the last line: the rate since the printer was made, as "took" counts (3,000 rows in 12 s)
    assert p.update(6000) == "[extract] 6,000/6,000 rows (100%) | 250 images/s | took 12s"


def test_last_line_says_how_long_it_took_and_carries_fields():
    clock = Clock()
    p = Progress("surrogate resnet18", total=4, unit="epochs", out=io.StringIO(), clock=clock)
    clock.t += 125
    assert p.update(4, loss=0.43219, images_per_s=1234.5) == \
        "[surrogate resnet18] 4/4 epochs (100%) | took 2m05s | loss 0.4322 | images per s 1234"


def test_epochs_without_rate_still_estimate_eta():
    clock = Clock()
    p = Progress("pretrain", total=10, unit="epochs", out=io.StringIO(), clock=clock)
    clock.t += 20
    assert p.update(2, loss=1.5) == "[pretrain] 2/10 epochs (20%) | ETA 1m20s | loss 1.5"


def test_throttle_skips_lines_but_never_the_last():
    clock, out = Clock(), io.StringIO()
    p = Progress("k-means", total=10, unit="iterations", every_s=5, out=out, clock=clock)
    printed = []
    for i in range(1, 11):
        clock.t += 1
        printed.append(p.update(i) is not None)
    assert printed == [True, False, False, False, False, True, False, False, False, True]
    assert len(out.getvalue().splitlines()) == 3


def test_unknown_total_prints_the_count_alone():
    clock = Clock()
    p = Progress("scan", unit="files", rate_unit="files/s", out=io.StringIO(), clock=clock)
    assert p.update(0) == "[scan] 0 files"
    clock.t += 2
    assert p.update(30) == "[scan] 30 files | 15 files/s"


def test_one_off_lines_leave_out_missing_fields():
    out = io.StringIO()
    assert say("select", "keep-set lm r0.5 written", out=out, units="12/20", images=3400, note=None) == \
        "[select] keep-set lm r0.5 written | units 12/20 | images 3,400"
    assert format_line("trial", accuracy=0.51234) == "[trial] accuracy 0.5123"


def test_finish_prints_a_closing_line_only_when_the_last_one_was_skipped():
    clock, out = Clock(), io.StringIO()
    p = Progress("extract", total=100, unit="rows", every_s=60, out=out, clock=clock)
    p.update(40)
    clock.t += 1
    assert p.update(97) is None  # throttled
    clock.t += 1
    assert p.finish(97) == "[extract] 97/100 rows (97%) | took 2s"  # 3 rows skipped as unreadable: 97 is the end
    assert p.finish(97) is None
    assert len(out.getvalue().splitlines()) == 2

"""The benchmark's arithmetic: percentiles, summaries, ratios, slope; the /proc readers."""

from __future__ import annotations

import os

import pytest

from worker.bench.procstat import cpu_seconds, parse_stat, read_stat, thread_ids
from worker.bench.stats import median, per_event, percentile, ratio, slope, summarize


def test_percentile_interpolates_between_ranks() -> None:
    ordered = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(ordered, 0) == 10.0
    assert percentile(ordered, 50) == 30.0
    assert percentile(ordered, 100) == 50.0
    assert percentile(ordered, 90) == pytest.approx(46.0)  # position 3.6
    assert percentile(ordered, 99.9) == pytest.approx(49.96)


def test_percentile_of_one_sample_and_bad_input() -> None:
    assert percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_summarize_uses_every_sample_unsorted() -> None:
    samples = [float(v) for v in range(1000, 0, -1)]  # 1000 .. 1, reversed on purpose
    summary = summarize(samples)
    assert summary["n"] == 1000
    assert summary["p50"] == pytest.approx(500.5)
    assert summary["p90"] == pytest.approx(900.1)
    assert summary["p99"] == pytest.approx(990.01)
    assert summary["p99.9"] == pytest.approx(999.001)
    assert summary["max"] == 1000.0
    assert summary["mean"] == pytest.approx(500.5)


def test_summarize_of_nothing_has_every_key() -> None:
    summary = summarize([])
    assert summary == {
        "n": 0, "p50": None, "p90": None, "p99": None, "p99.9": None, "mean": None, "max": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "reference", "expected"),
    [(3.0, 2.0, 1.5), (None, 2.0, None), (1.0, None, None), (1.0, 0.0, None), (1.0, -1.0, None)],
)
def test_ratio(value: float | None, reference: float | None, expected: float | None) -> None:
    assert ratio(value, reference) == expected


def test_median_skips_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None


def test_slope_is_least_squares() -> None:
    assert slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert slope([(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)]) == pytest.approx(0.0)
    assert slope([(0.0, 1.0)]) is None
    assert slope([(1.0, 1.0), (1.0, 2.0)]) is None


def test_per_event() -> None:
    assert per_event(0.5, 1000) == 0.0005
    assert per_event(0.5, 0) is None


# ---------------------------------------------------------------- /proc


def _stat_line(comm: str, utime: int, stime: int, rss_pages: int) -> str:
    # Fields 3..24 after comm: state, ppid, ..., utime (14), stime (15), ..., rss (24).
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 8 + [str(rss_pages)]
    fields += ["0"] * 20
    return f"4242 ({comm}) " + " ".join(fields) + "\n"


def test_parse_stat_reads_utime_stime_and_rss() -> None:
    stat = parse_stat(_stat_line("python", 150, 50, 1000), clk_tck=100, page_size=4096)
    assert stat.cpu_seconds == pytest.approx(2.0)
    assert stat.rss_bytes == 4096 * 1000


def test_parse_stat_survives_spaces_and_parentheses_in_comm() -> None:
    stat = parse_stat(_stat_line("a) b (c", 7, 3, 2), clk_tck=100, page_size=4096)
    assert stat.cpu_seconds == pytest.approx(0.1)
    assert stat.rss_bytes == 8192


@pytest.mark.parametrize("line", ["garbage", "1 (x) S 1 2 3"])
def test_parse_stat_refuses_other_text(line: str) -> None:
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        parse_stat(line)


def test_read_stat_of_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat.cpu_seconds > 0
    assert stat.rss_bytes > 1_000_000
    assert os.getpid() in thread_ids(os.getpid())
    with pytest.raises(FileNotFoundError):
        read_stat(2**22 + 12345)  # above pid_max's default: never a live process


def test_cpu_seconds_reads_the_process_clock_to_below_a_tick() -> None:
    here = os.getpid()
    first = cpu_seconds(here)
    while (second := cpu_seconds(here)) == first:  # bounded: this loop itself uses CPU
        pass
    assert 0 < second - first < 0.01  # finer than /proc/PID/stat's 10 ms ticks
    assert abs(second - read_stat(here).cpu_seconds) < 0.05
    with pytest.raises(FileNotFoundError):
        cpu_seconds(2**22 + 12345)  # above pid_max's default: never a live process

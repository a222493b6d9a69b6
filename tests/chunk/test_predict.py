"""``OpenPredictor``: when lookups of small files are worth warming their blocks for."""

from __future__ import annotations

from loftfs.vfs.predict import THRESHOLD, WINDOW, OpenPredictor


def read_pass(p: OpenPredictor, inodes: range) -> None:
    for i in inodes:
        p.looked_up(i)
        p.opened(i)


def test_starts_on_and_stays_on_while_files_are_read() -> None:
    p = OpenPredictor()
    assert p.likely()
    read_pass(p, range(1000))
    assert p.likely() and p.score > 0.99


def test_a_stat_only_pass_turns_it_off_soon_and_a_read_pass_back_on() -> None:
    p = OpenPredictor()
    decided = []
    for i in range(200):  # stat: looked up, never opened
        decided.append(p.likely())
        p.looked_up(i)
    off_after = decided.index(False)
    assert WINDOW < off_after <= WINDOW + 12  # the window's guesses wait, then a dozen misses
    assert not any(decided[off_after:])
    assert p.score < 0.01
    decided = []
    for i in range(1000, 1030):
        decided.append(p.likely())
        p.looked_up(i)
        p.opened(i)
    on_after = decided.index(True)
    assert 0 < on_after <= 12
    assert all(decided[on_after:])


def test_parallel_readers_within_the_window_count_as_reads() -> None:
    p = OpenPredictor()
    for start in range(0, 4000, WINDOW):  # WINDOW lookups, then their opens (in reverse)
        batch = range(start, start + WINDOW)
        for i in batch:
            p.looked_up(i)
        for i in reversed(batch):
            p.opened(i)
    assert p.score > 0.99


def test_half_of_the_files_opened_stays_near_the_threshold() -> None:
    p = OpenPredictor()
    for i in range(4000):
        p.looked_up(i)
        if i % 2:
            p.opened(i)
    assert abs(p.score - THRESHOLD) < 0.15


def test_opens_without_a_lookup_change_nothing() -> None:
    p = OpenPredictor()
    for i in range(40):
        p.looked_up(i)  # not opened: the score falls
    score = p.score
    for i in range(1000, 1100):  # opened through names the kernel still had
        p.opened(i)
    assert p.score == score

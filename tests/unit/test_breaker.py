"""The circuit breaker's states, on a clock the test moves by hand."""

from __future__ import annotations

from media_proxy.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row() -> None:
    clock = Clock()
    b = Breaker(threshold=3, cooldown=10, clock=clock)
    assert [b.failure() for _ in range(2)] == [False, False]
    assert b.allow() and b.state == "closed"
    assert b.failure() is True
    assert b.state == "open"
    assert not b.allow()


def test_a_success_resets_the_run() -> None:
    b = Breaker(threshold=2, cooldown=10, clock=Clock())
    b.failure()
    b.success()
    assert b.failure() is False
    assert b.allow()


def test_half_open_lets_one_trial_through() -> None:
    clock = Clock()
    b = Breaker(threshold=1, cooldown=10, clock=clock)
    b.failure()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state == "half-open"
    assert b.allow()  # the trial
    assert not b.allow()  # only one at a time
    b.success()
    assert b.state == "closed"
    assert b.allow()


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    b = Breaker(threshold=5, cooldown=10, clock=clock)
    for _ in range(5):
        b.failure()
    clock.now += 10
    assert b.allow()
    assert b.failure() is True  # one failure suffices in half-open state
    assert b.state == "open"
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()

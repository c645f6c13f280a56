"""The sending pause of one number: pause, one probe, resume; on a clock the test sets."""

from __future__ import annotations

from worker.daemon.pause import PauseReason, Pauses, SendingPause


def test_only_a_send_started_after_the_pause_can_close_it() -> None:
    now = [100.0]
    pause = SendingPause(clock=lambda: now[0])
    assert pause.trip(60, PauseReason(190, "token expired"))
    now[0] = 101.0
    assert not pause.succeeded(started=99.5)  # on its way before the error: proves nothing
    assert pause.slots(32) == 1 and pause.reason is not None
    now[0] = 161.0  # the pause is over: one probe goes
    assert pause.remaining() == 0 and pause.slots(32) == 1
    assert pause.succeeded(started=160.5) and pause.slots(32) == 32 and pause.reason is None


def test_each_number_has_its_own_pause() -> None:
    now = [0.0]
    pauses = Pauses(clock=lambda: now[0])
    pauses.number("111").trip(60, PauseReason(190, "token expired"))
    assert pauses.number("222").remaining() == 0 and pauses.number("222").slots(8) == 8
    assert pauses.describe() == "number 111: code 190: token expired"
    assert pauses.remaining() == 60

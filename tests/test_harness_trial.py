"""The trial's time limit in a process that runs several trials in turn (Tune's reuse_actors): the
timer fires for a running trial, never while Tune holds the trial in ``tune.report``, and never
after its trial ended. ``os._exit`` is replaced so that firing is recorded instead of ending pytest."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from harness.results import TIMEOUT_FILE
from harness.storage import open_storage
from harness.trial import TrialTimeout, Watchdog


class Exits:
    """The exit codes the watchdog asked for, and an event set at the first."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.fired = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.fired.set()


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> Exits:
    recorder = Exits()
    monkeypatch.setattr(os, "_exit", recorder)
    return recorder


def watchdog(tmp_path: Path, seconds_left: float) -> Watchdog:
    minutes = 0.01
    dog = Watchdog(open_storage(str(tmp_path)), "trial", minutes, started=time.time() - 60 * minutes + seconds_left)
    dog.RECHECK_S = 0.1
    return dog


def test_a_running_trial_past_its_limit_is_stopped_and_marked(tmp_path: Path, exits: Exits):
    watchdog(tmp_path, 0.2).start()
    assert exits.fired.wait(5) and exits.codes == [3]
    assert (tmp_path / "trial" / TIMEOUT_FILE).is_file()
    with pytest.raises(TrialTimeout, match="trial_timeout_minutes"):  # a restart of it fails at once
        watchdog(tmp_path, 30).start()


def test_the_timer_waits_while_tune_holds_the_trial_in_report(tmp_path: Path, exits: Exits):
    dog = watchdog(tmp_path, 0.1).start()
    with dog.waiting():
        time.sleep(0.6)  # past the limit, but blocked in tune.report: Tune's time, not a hang
        assert exits.codes == [] and not (tmp_path / "trial" / TIMEOUT_FILE).exists()
    assert exits.fired.wait(5) and exits.codes == [3]


def test_a_trial_that_ended_or_was_stopped_never_fires_in_the_reused_process(tmp_path: Path, exits: Exits):
    ended = watchdog(tmp_path / "ended", 0.2).start()
    ended.cancel()  # the trial function returned before its limit
    stopped = watchdog(tmp_path / "stopped", 0.1).start()
    with stopped.waiting():  # ASHA stopped it at this report; Tune then gives the process a new trial
        time.sleep(0.4)
        stopped.cancel()
    time.sleep(0.6)
    assert exits.codes == [] and not list(tmp_path.rglob(TIMEOUT_FILE))


def test_no_limit_arms_nothing(tmp_path: Path, exits: Exits):
    dog = Watchdog(open_storage(str(tmp_path)), "trial", None, started=0.0).start()
    assert dog._timer is None
    dog.cancel()

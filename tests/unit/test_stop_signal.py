"""Stopping on purpose (qwen3kd/stop.py): the signal and the deadline set the local flag; the
stop file tells the batch script. (Whole runs: tests/e2e/test_deadline.py, tests/slurm/.)"""

from __future__ import annotations

import os
import signal
import time

from qwen3kd.stop import JOB_START_ENV, STOP_FILE_ENV, StopSignal, mark_stopped


def test_usr1_sets_the_flag_and_nothing_else(monkeypatch):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopSignal()
        assert stop.local() is None and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)  # the process lives on: only the flag is set
        assert stop.local() == "SIGUSR1" and stop.agreed()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_deadline_counts_from_the_job_start(monkeypatch):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        monkeypatch.setenv(JOB_START_ENV, str(time.time() - 90))
        assert StopSignal(exit_after_minutes=1).local() == "train.exit_after_minutes reached"
        assert StopSignal(exit_after_minutes=2).local() is None
        assert StopSignal(exit_after_minutes=None).local() is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_stop_file_is_written_by_rank_0_only(monkeypatch, tmp_path):
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "stopped"))
    monkeypatch.setenv("RANK", "1")
    mark_stopped("stopped at step 3")
    assert not (tmp_path / "stopped").exists()
    monkeypatch.setenv("RANK", "0")
    mark_stopped("stopped at step 3")
    assert (tmp_path / "stopped").read_text() == "stopped at step 3\n"

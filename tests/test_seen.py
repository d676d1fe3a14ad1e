"""Redelivered tasks the worker already handled are not uploaded again (worker.upload.seen)."""

from __future__ import annotations

import threading

import pytest

from worker.upload.pool import UploadThreadPool
from worker.upload.seen import SeenTasks

pytestmark = pytest.mark.timeout(30)


def test_a_task_done_is_not_run_again_and_one_not_done_is() -> None:
    seen = SeenTasks()
    assert seen.start("a", timeout=1)
    seen.finish("a", done=True)
    assert not seen.start("a", timeout=1)  # its outcome is confirmed: only acknowledge it
    assert seen.start("b", timeout=1)
    seen.finish("b", done=False)  # failed before its outcome was confirmed
    assert seen.start("b", timeout=1)


def test_a_redelivery_waits_for_the_first_run_still_going() -> None:
    seen = SeenTasks()
    assert seen.start("t", timeout=1)
    waiting = threading.Event()
    answer: list[bool] = []

    def redelivered() -> None:
        waiting.set()
        answer.append(seen.start("t", timeout=30))

    thread = threading.Thread(target=redelivered)
    thread.start()
    assert waiting.wait(10)
    seen.finish("t", done=True)
    thread.join(10)
    assert answer == [False]


def test_a_first_run_that_never_ends_lets_the_redelivery_run() -> None:
    seen = SeenTasks()
    assert seen.start("t", timeout=1)
    assert seen.start("t", timeout=0.01)  # a bounded wait, then it runs (at least once)


def test_only_so_many_are_remembered() -> None:
    seen = SeenTasks(remembered=2)
    for task in ("a", "b", "c"):
        seen.start(task, timeout=1)
        seen.finish(task, done=True)
    assert seen.start("a", timeout=1) and not seen.start("c", timeout=1)


def test_the_pool_lets_a_cancelled_upload_finish() -> None:
    pool = UploadThreadPool(limit=1)
    assert pool.terminate_job(1234) is None  # no exception, no kill: the thread goes on

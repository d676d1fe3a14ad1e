"""Task events are flushed by the event loop only, never by a pool thread (worker.upload.pool)."""

from __future__ import annotations

import threading

import pytest
from kombu import Connection

from worker.app import ActivityApp

pytestmark = pytest.mark.timeout(30)


def test_a_pool_thread_buffers_task_events_and_leaves_the_flush_to_the_loop() -> None:
    app = ActivityApp("test-task-events", set_as_current=False, broker="memory://")
    loop_turns: list[str] = []
    flushed_by: list[str] = []
    with Connection("memory://") as connection:
        dispatcher = app.events.Dispatcher(
            connection, hostname="test@host", enabled=True, buffer_group=["task"],
            on_send_buffered=lambda: loop_turns.append(threading.current_thread().name),
        )
        real_flush = dispatcher.flush

        def flush(*args: object, **kwargs: object) -> None:
            flushed_by.append(threading.current_thread().name)
            real_flush(*args, **kwargs)

        dispatcher.flush = flush

        def pool_thread() -> None:  # what Request.on_success does on a pool thread, many times
            for n in range(500):
                dispatcher.send("task-succeeded", uuid=f"task-{n}", result="{}", runtime=0.1)

        thread = threading.Thread(target=pool_thread, name="pool-thread")
        thread.start()
        thread.join()
        assert flushed_by == []  # Celery's default (a flush every 24 events) would flush on the thread
        assert len(loop_turns) == 500  # each event asked the loop for a flush
        dispatcher.flush()  # the loop's turn
        assert flushed_by == ["MainThread"]
        assert sum(len(events) for events in dispatcher._group_buffer.values()) == 0
        dispatcher.close()

"""Flower's tasks page in a real browser: headless Chromium, a real worker, Flower as the Procfile runs it.

Flower's tasks page is an empty table until its JavaScript fetches ``/tasks/datatable`` (behind
the same password): only a browser shows what an operator sees. The check: every batch is listed
as an ``activities.upload`` task whose arguments read ``account='...', asset_id='...', N events``,
and nothing of the events themselves (fields, identities, emails) is on the page.

The page is also saved as a screenshot; with ``UPDATE_SCREENSHOTS=1`` it replaces the README's
``docs/flower-tasks.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.harness import ROOT, QueueSet, WorkerProcess, event, publish_events
from tests.integration.flower_support import (
    DEADLINE,
    PASSWORD,
    USER,
    FlowerProcess,
    poll,
    running_flower,
    worker_name,
)
from worker.ops.flower import TASK_COLUMNS
from worker.sandbox import Sandbox

#: Events per batch, one batch (one asset_id) each.
BATCH_SIZES = (5, 3, 2)  # one full batch (ACTIVITY_BATCH_SIZE=5): a task alone; two small ones: a bundle

#: How long one Chromium run may take (it renders for at most 8 s of virtual time).
BROWSER_DEADLINE = 90.0

#: The screenshot the README shows, replaced when UPDATE_SCREENSHOTS is set.
SCREENSHOT = ROOT / "docs" / "flower-tasks.png"

#: What must never be on a Flower page: event fields and the events' identities.
PRIVATE = ("customer-", "@example.com", "identity", "activity_params", "activity_source", "Purchase", "ev-")


def chromium() -> str:
    """Chromium's path; without it, fail in CI and skip elsewhere, saying why."""
    path = shutil.which("chromium")
    if path:
        return path
    message = "chromium is not installed: the test of Flower's tasks page needs a real browser"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message + " (install Debian's `chromium` package)")


def browse(browser: str, profile: Path, url: str, *options: str) -> str:
    """Open ``url`` in a headless Chromium of its own (``profile``) and return the DOM it rendered.

    ``--virtual-time-budget`` lets the page's scripts and their requests run to the end before
    the DOM is dumped: no guessing how long the table takes to load.
    """
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=8000", *options, "--dump-dom", url,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=BROWSER_DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"chromium did not finish in {BROWSER_DEADLINE} s:\n{err.decode(errors='replace')[-3000:]}")
    finally:
        try:  # helper processes it may leave behind
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, f"chromium failed ({process.returncode}):\n{err.decode(errors='replace')[-3000:]}"
    return out.decode()


class Page(HTMLParser):
    """A rendered page: its visible text, and the columns and rows of Flower's ``#tasks-table``."""

    def __init__(self, dom: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.columns: list[str] = []
        self.rows: list[list[str]] = []
        self._in_table = False
        self._section: str | None = None
        self._cell: list[str] | None = None
        self._skipping = 0  # inside <script> or <style>
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skipping += 1
        found = dict(attrs)
        if tag == "table" and found.get("id") == "tasks-table":
            self._in_table = True
        if not self._in_table:
            return
        if tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "th" and self._section == "thead":
            self.columns.append(found.get("data-column") or "")
        elif tag == "tr" and self._section == "tbody":
            self.rows.append([])
        elif tag == "td" and self._section == "tbody":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skipping = max(0, self._skipping - 1)
        if not self._in_table:
            return
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("thead", "tbody"):
            self._section = None
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def visible_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def tasks(self) -> list[dict[str, str]]:
        return [dict(zip(self.columns, row)) for row in self.rows if len(row) == len(self.columns)]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file (from its IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture
def browser() -> str:
    """Chromium, looked for first: without it nothing else is started."""
    return chromium()


@pytest.fixture
def flower(queues: QueueSet) -> Iterator[tuple[FlowerProcess, str]]:
    """Flower as the Procfile starts it (worker.ops.flower lists the arguments on the tasks page)."""
    with running_flower(queues) as running:
        yield running


def test_flower_tasks_page_lists_batch_summaries_in_a_browser(
    browser: str,
    start_worker: Callable[..., WorkerProcess],
    flower: tuple[FlowerProcess, str],
    queues: QueueSet,
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    process, url = flower
    worker = start_worker(ACTIVITY_BATCH_SIZE=5)
    name = worker_name(worker)
    auth = (USER, PASSWORD)

    # Flower sees tasks only once its event consumer is in place: the worker's heartbeat says so.
    def alive() -> bool | None:
        answer = requests.get(url + "/api/workers", params={"status": "1"}, auth=auth, timeout=10)
        answer.raise_for_status()
        return True if answer.json().get(name) else None

    assert poll(alive, DEADLINE), f"Flower never saw {name}; its output:\n{process.log()[-3000:]}"

    # One batch per asset_id, each event with an identity (an email) that must stay off the page.
    batches = {f"shop-{uuid.uuid4().hex[:8]}": size for size in BATCH_SIZES}
    bodies = [
        [event(f"ev-{n}-{i}", asset_id, identity=f"customer-{n}-{i}@example.com") for i in range(size)]
        for n, (asset_id, size) in enumerate(batches.items())
    ]
    # the full batch first: its upload measures the API's round trip, which sets how many small
    # batches share a task (before any is measured, the real API's 150 ms is assumed: one each)
    publish_events(queues.settings.queue, bodies[:1])
    assert sandbox.wait_until(lambda s: s.accepted_count() == BATCH_SIZES[0], timeout=DEADLINE)
    publish_events(queues.settings.queue, bodies[1:])
    assert sandbox.wait_until(lambda s: s.accepted_count() == sum(BATCH_SIZES), timeout=DEADLINE)

    def finished_tasks() -> dict[str, dict[str, Any]] | None:
        answer = requests.get(url + "/api/tasks", params={"taskname": "activities.upload"}, auth=auth, timeout=10)
        answer.raise_for_status()
        ours = {task_id: task for task_id, task in answer.json().items()
                if any(asset_id in (task.get("args") or "") for asset_id in batches)}
        done = len(ours) == len(expected) and all(task.get("state") == "SUCCESS" for task in ours.values())
        return ours if done else None

    full, *small = batches
    expected = {  # what each task's arguments say: a summary, never events
        full: f"account='default', asset_id={full!r}, {batches[full]} events",
        small[0]: f"account='default', {len(small)} batches, {sum(batches[a] for a in small)} events: "
                  + ", ".join(repr(a) for a in small),
    }

    known = poll(finished_tasks, DEADLINE)
    assert known, f"Flower never had the upload tasks; its output:\n{process.log()[-3000:]}"

    # The tasks page, as an operator's browser renders it (table filled by its JavaScript).
    # Chromium takes the password from the URL for this top-level page and reuses it for the
    # page's own /tasks/datatable request. The page is filtered on this test's worker (the link
    # its worker column offers), so tasks of other workers on the same broker cannot crowd it.
    host = url.removeprefix("http://")
    shot = tmp_path / "flower-tasks.png"
    page = Page(browse(browser, tmp_path / "profile",
                       f"http://{USER}:{PASSWORD}@{host}/tasks?worker={quote(name, safe='')}",
                       f"--screenshot={shot}", "--window-size=1400,900"))
    assert page.columns == TASK_COLUMNS.split(","), page.columns
    rows = page.tasks()
    for asset_id, summary in expected.items():
        ours = [row for row in rows if asset_id in row["args"]]
        assert len(ours) == 1, (asset_id, rows)
        row = ours[0]
        assert row["name"] == "activities.upload", row
        assert row["args"] == summary, row
        assert row["state"] == "SUCCESS", row
        assert row["worker"] == name, row
        assert row["uuid"].startswith(tuple(known)), (row, list(known))
    shown = page.visible_text()
    for private in PRIVATE:
        assert private not in shown, f"{private!r} on Flower's tasks page: {shown}"

    # One task's own page shows the same summary, whatever the list's columns.
    task_id, task = next(iter(known.items()))
    detail = Page(browse(browser, tmp_path / "profile-task", f"http://{USER}:{PASSWORD}@{host}/task/{task_id}"))
    shown = detail.visible_text()
    assert task["args"] in shown and task_id in shown, shown
    for private in PRIVATE:
        assert private not in shown, f"{private!r} on Flower's task page: {shown}"

    # Without the password the browser gets no task at all.
    anonymous = browse(browser, tmp_path / "profile-anonymous", f"{url}/tasks")
    assert "tasks-table" not in anonymous and not any(asset_id in anonymous for asset_id in batches), anonymous

    # The screenshot: the full window, with the table (a blank or login page is a few KB).
    assert png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 30_000, shot.stat().st_size
    if os.environ.get("UPDATE_SCREENSHOTS"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

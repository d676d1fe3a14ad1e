"""``--baseline REF``: the worker as it was at a commit, on the same backlogs, in the same run.

On a shared machine two runs minutes apart differ by more than most changes do, so a change is
judged by an A/B inside one run: each case's backlog is preloaded once more, and after the
worker of this checkout has drained its copy, the worker of ``REF`` drains the other. The old
code is that commit's ``worker/`` and ``config/`` (``git archive``), unpacked once under
``bench-results/baseline/<commit>``; its worker runs from there (Python imports the package of
its working directory first) with this checkout's virtualenv.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

#: What a worker needs of the tree: its package and its settings.
PACKAGES: tuple[str, ...] = ("worker", "config")


def extract(ref: str, *, repository: Path, into: Path) -> tuple[str, Path]:
    """(the commit's short name, the directory its worker runs from) for ``ref`` (a commit,
    branch or tag of ``repository``); unpacks it under ``into`` unless it already is."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=repository,
                            capture_output=True, text=True, check=True).stdout.strip()
    target = into / commit
    if not all((target / package).is_dir() for package in PACKAGES):
        archive = subprocess.run(["git", "archive", "--format=tar", commit, *PACKAGES], cwd=repository,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return commit, target

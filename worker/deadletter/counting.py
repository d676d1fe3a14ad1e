"""What ``count`` says: how many dead letters, by reason, by asset_id, by account, and crossed.

:class:`Counts` tallies the dead letters a count selected (:mod:`worker.deadletter.reader`
reads them) and shows them two ways: small text tables, largest counts first, for a person at
a terminal, and one JSON object (``--json``) with every key, for scripts. The tables show the
accounts only when there is more than one (until the worker delivers to several accounts,
every dead letter is the ``default`` account's); the JSON always has ``by_account``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from worker.deadletter.handback import held_elsewhere
from worker.deadletter.reader import Letter, account_of, replayable, replays_of

#: How ``count`` shows dead letters without an ``asset_id`` (unparseable bodies).
NO_ASSET = "(none)"

#: The asset_ids ``count`` shows in its tables (the largest counts); ``--json`` has them all.
TOP_ASSETS = 20


@dataclass
class Counts:
    """How many dead letters there are, by reason, by asset_id, by account, and by reason and each."""

    total: int = 0
    #: What replay would leave: see :func:`~worker.deadletter.reader.replayable`.
    not_replayable: int = 0
    #: Dead letters whose event had been replayed before (``replays`` > 0): a loop, maybe.
    replayed: int = 0
    #: Bodies in parts with a part missing (in the queue, one might still be on its way).
    incomplete: int = 0
    #: Dead letters read, selected or not.
    scanned: int = 0
    #: Consumers of the queue that still held dead letters when the count started: not counted.
    other_consumers: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_asset_id: Counter[str] = field(default_factory=Counter)
    by_reason_and_asset_id: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_account: Counter[str] = field(default_factory=Counter)
    by_reason_and_account: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, letter: Letter) -> None:
        envelope = letter.envelope
        reason, asset_id = str(envelope.get("reason")), str(envelope.get("asset_id") or NO_ASSET)
        account = account_of(envelope)
        self.total += 1
        self.not_replayable += not replayable(letter)
        self.incomplete += not letter.complete
        self.replayed += replays_of(envelope) > 0
        self.by_reason[reason] += 1
        self.by_asset_id[asset_id] += 1
        self.by_reason_and_asset_id[reason, asset_id] += 1
        self.by_account[account] += 1
        self.by_reason_and_account[reason, account] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "not_replayable": self.not_replayable, "replayed": self.replayed,
                "incomplete": self.incomplete, "scanned": self.scanned, "other_consumers": self.other_consumers,
                "by_reason": dict(self.by_reason.most_common()),
                "by_asset_id": dict(self.by_asset_id.most_common()),
                "by_reason_and_asset_id": _nested(self.by_reason_and_asset_id),
                "by_account": dict(self.by_account.most_common()),
                "by_reason_and_account": _nested(self.by_reason_and_account)}

    def table(self, top: int = TOP_ASSETS) -> str:
        """Small text tables, largest counts first, at most ``top`` asset_ids in each."""
        of = f" of {self.scanned} in the queue" if self.scanned > self.total else ""
        lines = [f"dead letters: {self.total}{of} (not replayable: {self.not_replayable})"]
        if self.other_consumers:
            lines.append(held_elsewhere(self.other_consumers, "counted").lstrip("; "))
        if not self.total:
            return "\n".join(lines)
        lines.append(f"replayed before and dead again: {self.replayed}")
        if self.incomplete:
            lines.append(f"bodies in parts with a part missing: {self.incomplete}")
        assets = [asset_id for asset_id, _ in self.by_asset_id.most_common(top)]
        accounts = [account for account, _ in self.by_account.most_common()] if len(self.by_account) > 1 else []
        lines += _column("reason", list(self.by_reason), self.by_reason)
        if accounts:
            lines += _column("account", accounts, self.by_account)
        lines += _column("asset_id", assets, self.by_asset_id)
        if len(self.by_reason) > 1:
            for title, keys, pairs in (("account", accounts, self.by_reason_and_account),
                                       ("asset_id", assets, self.by_reason_and_asset_id)):
                if keys:
                    lines += ["", *self._cross_table(title, keys, pairs)]
        more = len(self.by_asset_id) - len(assets)
        if more > 0:
            lines.append(f"(and {more} more asset_ids: --json lists them all)")
        return "\n".join(lines)

    def _cross_table(self, title: str, keys: list[str], pairs: Counter[tuple[str, str]]) -> list[str]:
        """``title`` (account, asset_id) down, reason across: who fails, and how."""
        reasons = [reason for reason, _ in self.by_reason.most_common()]
        first = max(len(title), *map(len, keys))
        widths = [max(5, len(reason)) for reason in reasons]
        rows = ["  ".join([f"{title:<{first}}", *(f"{r:>{w}}" for r, w in zip(reasons, widths))])]
        for key in keys:
            cells = [pairs[reason, key] for reason in reasons]
            rows.append("  ".join([f"{key:<{first}}", *(f"{n or '.':>{w}}" for n, w in zip(cells, widths))]))
        return rows


def _column(title: str, keys: list[str], counter: Counter[str]) -> list[str]:
    """One table of two columns (a blank line before it): ``title`` and count."""
    width = max([len(title), *map(len, keys)])
    return ["", f"{title:<{width}}  count", *(f"{key:<{width}}  {counter[key]:>5}" for key in keys)]


def _nested(pairs: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{reason: {key: count}}, largest counts first."""
    both: dict[str, dict[str, int]] = {}
    for (reason, key), number in pairs.most_common():
        both.setdefault(reason, {})[key] = number
    return both

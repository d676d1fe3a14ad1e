"""The benchmark's messages: unique, realistic purchase events, shaped per case.

Every event carries its own ``event_id`` so the sandbox's copy can be checked for losses and
duplicates, and is about 600 bytes, like a real purchase with a few items: the size matters,
since parsing, batching and uploading cost per byte as much as per event. Timestamps are
current, so the worker's "older than 24 hours" warning (a real-world rarity) stays out of the
measurement. Generation is seeded: two runs publish the same bytes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

#: Events per message of the array cases (a producer flushing its buffer).
ARRAY_SIZE = 50

#: Seed of the random choices (asset ids, items, amounts): the same bytes every run.
SEED = 20261126

#: Products the items are drawn from: (name, category, price).
PRODUCTS: tuple[tuple[str, str, float], ...] = (
    ("Vitamin C Face Serum 30ml", "skincare", 549.0),
    ("Hyaluronic Acid Moisturiser 50g", "skincare", 399.5),
    ("Sunscreen SPF 50 PA++++ 80g", "skincare", 449.0),
    ("Argan Oil Shampoo 300ml", "haircare", 325.0),
    ("Matte Lipstick - Ruby Red", "makeup", 299.0),
    ("Bamboo Toothbrush (pack of 4)", "personal-care", 199.0),
    ("Green Tea Face Wash 100ml", "skincare", 249.0),
)


@dataclass(frozen=True)
class Case:
    """One shape of traffic: events per message and how many distinct asset ids."""

    key: str  #: short name, used in the JSON and the logs
    per_message: int  #: 1 = single-event messages; more = JSON arrays of that many
    assets: int  #: distinct asset_id values the events are spread over

    @property
    def title(self) -> str:
        shape = "single-event messages" if self.per_message == 1 else f"{self.per_message}-event arrays"
        return f"{shape}, {self.assets} asset_ids"


#: The four cases, in the order they run and print.
CASES: tuple[Case, ...] = (
    Case("single-7", 1, 7),
    Case("array50-7", ARRAY_SIZE, 7),
    Case("single-1000", 1, 1000),
    Case("array50-1000", ARRAY_SIZE, 1000),
)

#: The case run twice, against the instant API and against a slow one (``--latency``): how
#: much of the instant rate a worker keeps when each upload takes a real round trip.
LATENCY_CASE = Case("single-100", 1, 100)


def asset_ids(count: int) -> list[str]:
    """``count`` asset ids shaped like Netcore's (20 lowercase alphanumerics), stable per index."""
    return [hashlib.sha1(f"bench-asset-{i}".encode()).hexdigest()[:20] for i in range(count)]


def purchase(event_id: str, asset_id: str, rng: random.Random, timestamp: str) -> dict[str, Any]:
    """One purchase event of about 600 bytes (the tests' valid event, with a real basket)."""
    items: list[dict[str, Any]] = []
    total = 0.0
    for product, category, price in rng.sample(PRODUCTS, 2):
        quantity = rng.randint(1, 3)
        total += price * quantity
        items.append({"product_name": product, "category": category, "price": price,
                      "quantity": quantity, "sku": f"SKU-{rng.randrange(10**6):06d}"})
    params = {
        "event_id": event_id,
        "order_id": f"ORD-{rng.randrange(10**9):09d}",
        "currency": "INR",
        "total": round(total, 2),
        "payment_method": rng.choice(("upi", "card", "cod", "netbanking")),
        "coupon_code": rng.choice(("", "WELCOME10", "FESTIVE25")),
        "city": rng.choice(("Mumbai", "Pune", "Bengaluru", "Delhi", "Chennai")),
        "utm_source": rng.choice(("google", "email", "instagram")),
        "items": items,
    }
    return {
        "activity_name": "Purchase",
        "timestamp": timestamp,
        "identity": f"customer-{rng.randrange(10**7):07d}@example.com",
        "activity_source": "web",
        "asset_id": asset_id,
        "activity_params": params,
    }


def events(run_id: str, case: Case, count: int, *, seed: int = SEED) -> Iterator[dict[str, Any]]:
    """``count`` unique events of ``case``, asset ids drawn at random (seeded)."""
    rng = random.Random(f"{seed}-{case.key}")
    ids = asset_ids(case.assets)
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for i in range(count):
        yield purchase(f"{run_id}-{case.key}-{i:07d}", rng.choice(ids), rng, timestamp)


def bodies(run_id: str, case: Case, count: int) -> list[bytes]:
    """The message bodies carrying ``count`` events: one event each, or arrays."""
    stream = events(run_id, case, count)
    if case.per_message == 1:
        return [orjson.dumps(e) for e in stream]
    out: list[bytes] = []
    chunk: list[dict[str, Any]] = []
    for e in stream:
        chunk.append(e)
        if len(chunk) == case.per_message:
            out.append(orjson.dumps(chunk))
            chunk = []
    if chunk:
        out.append(orjson.dumps(chunk))
    return out


def mean_event_bytes(sample: list[bytes], per_message: int) -> float:
    """Average JSON size of one event in ``sample`` (for the report)."""
    if not sample:
        return 0.0
    return sum(len(b) for b in sample) / (len(sample) * per_message)

"""The order in which a job admits its rows: as read, or re-ordered within a bounded window.

An offline job sees its data ahead of time. Within a window of ``window``
prepared rows (memory stays bounded by it), ``length`` admits the shortest
prompts first, so a decode batch holds prompts of similar lengths, and
``prefix`` sorts rows by their token ids, so rows that share a prefix run
back to back and hit the prefix cache before its blocks are evicted.
Results are keyed by the row index, so the order never changes what is
written, only when.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

ORDERS = ("input", "length", "prefix")


def admission_order(items: Iterable[Optional[T]], order: str, window: int,
                    key_ids: Callable[[T], list[int]],
                    hold: Callable[[Optional[T]], bool] = lambda it: it is not None) -> Iterator[Optional[T]]:
    """Yield ``items`` re-ordered window by window. Items ``hold`` rejects
    (rows that became errors while being prepared; by default ``None``)
    pass straight through, never held."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if window < 1:
        raise ValueError(f"order window must be at least 1 row, got {window}")
    if order == "input" or window == 1:
        yield from items
        return
    key = (lambda it: len(key_ids(it))) if order == "length" else key_ids
    held: list[T] = []
    for it in items:
        if not hold(it):
            yield it
            continue
        held.append(it)
        if len(held) >= window:
            held.sort(key=key)  # stable: ties keep input order
            yield from held
            held = []
    held.sort(key=key)
    yield from held

"""Items submitted in one turn of the event loop leave as one send.

A rollout's groups that one engine step finishes resume their tasks in the same turn of the
event loop; each would otherwise be one message, and every message costs each hop (sender,
broker, receiver) a fixed share of CPU whatever its size. ``TurnCoalescer.submit`` queues the
item and schedules one flush behind the tasks already woken in this turn; the flush sends a
lone item as it is and two or more as ``batch(items)`` (e.g. ``RolloutBatch``), and every
submitter returns once that send is done, so back-pressure still reaches each of them.

Invariants and failure behaviour:
- Order is kept: items are sent in the order submitted, batches in the order flushed (the
  channel keeps the order of sends that wait).
- An item is in exactly one send. If that send raises, every submitter of its batch gets the
  exception; a cancelled submitter does not cancel the send of the others (its item may still
  go out, as an item handed to a socket may).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


class TurnCoalescer(Generic[T]):
    """``send(item)`` for a turn's lone item, ``send(batch(items))`` for two or more."""

    def __init__(self, send: Callable[[Any], Awaitable[None]], batch: Callable[[list[T]], Any]) -> None:
        self._send, self._batch = send, batch
        self._items: list[T] = []
        self._flush: asyncio.Task | None = None
        self.sends = 0
        """Sends made (messages), against the items submitted: ``submitted / sends`` is the
        mean batch."""
        self.submitted = 0

    async def submit(self, item: T) -> None:
        self._items.append(item)
        self.submitted += 1
        if self._flush is None:
            # A task's first step runs after the callbacks already queued for this turn: the
            # other tasks the same engine step woke submit before it runs.
            self._flush = asyncio.get_running_loop().create_task(self._send_turn())
        await asyncio.shield(self._flush)

    async def _send_turn(self) -> None:
        items, self._items, self._flush = self._items, [], None
        self.sends += 1
        await self._send(items[0] if len(items) == 1 else self._batch(items))

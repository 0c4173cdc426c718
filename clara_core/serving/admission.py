"""How many requests the server holds at once: a full queue answers 503 at once instead of waiting."""

from __future__ import annotations

from .errors import QueueFull


class Admission:
    """Counts admitted requests (waiting for or in generation). Single event loop: no locks needed."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.max_queue:
            raise QueueFull(
                f"the server is at its limit of {self.max_queue} requests (--max-queue); retry shortly"
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

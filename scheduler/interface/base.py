"""The interface every scheduler offers: FastDeploy's four calls, with their meaning kept, plus
cancel, reset, stats and a live change of configuration."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from scheduler.config import SchedulerConfig
from scheduler.messages import Request, Result


class Scheduler(ABC):
    """Queue requests for nodes and carry their results back to the origin."""

    @abstractmethod
    def put_requests(self, requests: list[Request]) -> list[tuple[str, str | None]]:
        """Queue ``requests``; answer ``(request_id, error or None)`` for exactly these, in order."""

    @abstractmethod
    def get_requests(
        self,
        available_blocks: int,
        block_size: int,
        reserved_output_blocks: int,
        max_num_batched_tokens: int,
        batch: int = 1,
    ) -> list[Request]:
        """Hand out up to ``batch`` waiting requests that fit the KV-block and token budgets, FIFO."""

    @abstractmethod
    def put_results(self, results: list[Result]) -> None:
        """Deliver results of any node to their requests' origin, in order per request."""

    @abstractmethod
    def get_results(self) -> dict[str, list[Result]]:
        """Take the results delivered so far; a request is forgotten after its final result."""

    @abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Cancel a request; True when it was known and not yet finished."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every request and result."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Queue lengths, load scores and node states, for the console."""

    @abstractmethod
    def apply_config(self, config: SchedulerConfig) -> None:
        """Take a changed configuration without a restart."""

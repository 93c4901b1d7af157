"""A lease in Redis: one holder at a time, renewed by that holder, taken over by another within its
time to live once the holder stops renewing (``lua/lease.lua``). The console's pulse broadcasts from
one process per console Redis this way."""

from __future__ import annotations

import uuid

from redis import Redis

from scheduler import scripts
from scheduler.connection import ScriptRunner


class Lease:
    def __init__(self, redis: Redis, key: str, ttl_ms: int) -> None:
        self.runner = ScriptRunner(redis)
        self.key, self.ttl_ms = key, ttl_ms
        self.holder = uuid.uuid4().hex

    def hold(self) -> bool:
        """Take the lease when free, renew it when ours; True while we hold it."""
        call = scripts.HOLD_LEASE.call_standalone(lease_key=self.key, holder=self.holder, ttl_ms=self.ttl_ms)
        return bool(self.runner.run_scripts([call])[0])

    def release(self) -> None:
        """Give it up, if ours, so another may take it at once."""
        call = scripts.RELEASE_LEASE.call_standalone(lease_key=self.key, holder=self.holder)
        self.runner.run_scripts([call])

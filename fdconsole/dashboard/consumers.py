"""WebSocket feed of the cluster's node states for the live pages (logged-in users only)."""

from __future__ import annotations

import asyncio
import contextlib

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from fdconsole.nodes.models import Node
from fdconsole.nodes.status import describe_nodes

PUSH_INTERVAL_S = 1.0


class ClusterConsumer(AsyncJsonWebsocketConsumer):
    """Sends a snapshot of every node (state, load, heartbeat age) each second."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        await self.accept()
        self._pusher = asyncio.create_task(self._push_loop())

    async def disconnect(self, code: int) -> None:
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher

    async def _push_loop(self) -> None:
        while True:
            await self.send_json({"type": "nodes", "nodes": await self._snapshot()})
            await asyncio.sleep(PUSH_INTERVAL_S)

    @database_sync_to_async
    def _snapshot(self) -> list[dict]:
        return describe_nodes(list(Node.objects.select_related("topic")))

"""WebSocket feeds of the live pages: ``ws/cluster/`` and ``ws/topics/<topic>/`` (logged-in users only).

A consumer joins its channel layer group, sends a hello (the current state with recent chart points and
events) and then forwards what the pulse (``fdconsole.dashboard.pulse``) broadcasts to the group.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from fdconsole.dashboard.pulse import CLUSTER_GROUP, hello, topic_group
from fdconsole.topics.models import Topic

UNAUTHORIZED, NOT_FOUND = 4401, 4404


class LiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=UNAUTHORIZED)
            return
        self.topic = self.scope.get("url_route", {}).get("kwargs", {}).get("topic")
        if self.topic is not None and not await database_sync_to_async(_topic_exists)(self.topic):
            await self.close(code=NOT_FOUND)
            return
        self.group = CLUSTER_GROUP if self.topic is None else topic_group(self.topic)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json(await database_sync_to_async(hello)(self.topic))

    async def disconnect(self, code: int) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def live_update(self, event: dict) -> None:
        await self.send_json(event["message"])


def _topic_exists(name: str) -> bool:
    return Topic.objects.filter(name=name).exists()

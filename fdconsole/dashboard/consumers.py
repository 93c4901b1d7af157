"""WebSocket feeds of the live pages: ``ws/cluster/`` and ``ws/topics/<topic>/`` (logged-in users only).

A consumer joins its channel layer group, sends a hello (the current state with recent chart points and
events) and then forwards what the pulse (``fdconsole.dashboard.pulse``) broadcasts to the group.

A socket lives only as long as its session logs an active user in. It closes with code 4401
(UNAUTHORIZED) when its user logs out (from any session), is deactivated or is deleted, within moments
(``fdconsole.dashboard.signals``), and when a check of its own, every SESSION_CHECK_S, finds that its
session ended without a signal (expired, flushed, a changed password). A handshake without an active
user's session is refused (a browser sees HTTP 403). A check that cannot be done (the database is down)
closes the socket with 1011: a page reconnects once the console can vouch for its session again.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import import_module

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib import auth
from django.http import HttpRequest

from fdconsole.dashboard.pulse import CLUSTER_GROUP, hello, topic_group
from fdconsole.dashboard.signals import user_group
from fdconsole.topics.models import Topic

log = logging.getLogger(__name__)
UNAUTHORIZED, NOT_FOUND = 4401, 4404
SERVER_ERROR = 1011  # RFC 6455: the server could not go on (here: it could not verify the session)
SESSION_CHECK_S = 30.0  # how often a socket verifies its session on its own (what no signal announces)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close(code=UNAUTHORIZED)
            return
        self.user_group = user_group(user.pk)
        await self.channel_layer.group_add(self.user_group, self.channel_name)
        if not await self._logged_in():  # a logout between the handshake and joining the user's group
            await self.close(code=UNAUTHORIZED)
            return
        self.topic = self.scope.get("url_route", {}).get("kwargs", {}).get("topic")
        if self.topic is not None and not await database_sync_to_async(_topic_exists)(self.topic):
            await self.close(code=NOT_FOUND)
            return
        self.group = CLUSTER_GROUP if self.topic is None else topic_group(self.topic)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.checks = asyncio.create_task(self._check_every(SESSION_CHECK_S))
        await self.send_json(await hello(self.topic))

    async def disconnect(self, code: int) -> None:
        checks = getattr(self, "checks", None)
        if checks is not None:
            checks.cancel()
        for group in (getattr(self, "group", None), getattr(self, "user_group", None)):
            if group is not None:
                await self.channel_layer.group_discard(group, self.channel_name)

    async def live_update(self, event: dict) -> None:
        await self.send_json(event["message"])

    async def session_close(self, event: dict) -> None:
        await self.close(code=UNAUTHORIZED)

    async def close(self, code=None, reason=None) -> None:
        """Once: a second close (a logout and a check, say, landing together) would reach daphne after
        the first, while the closing handshake is still under way."""
        if getattr(self, "closing", False):
            return
        self.closing = True
        await super().close(code=code, reason=reason)

    async def session_verify(self, event: dict) -> None:
        await self._verify()

    async def _check_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not await self._verify():
                return
            await self.channel_layer.group_add(self.user_group, self.channel_name)  # outlives group expiry

    async def _verify(self) -> bool:
        """Closes the socket unless its session still logs its user in; whether it stays open."""
        try:
            logged_in = await self._logged_in()
        except Exception as exc:  # the socket's own top-level check: what cannot be verified is closed
            log.warning("could not verify a WebSocket's session (%s: %s); closing it",
                        type(exc).__name__, exc)
            await self.close(code=SERVER_ERROR)
            return False
        if not logged_in:
            await self.close(code=UNAUTHORIZED)
        return logged_in

    async def _logged_in(self) -> bool:
        session = self.scope.get("session")
        user_id = self.scope["user"].pk
        if session is None:  # mounted without the session middleware (tests): the user's record decides
            return await database_sync_to_async(_user_active)(user_id)
        return await database_sync_to_async(_session_user_id)(session.session_key) == user_id


def _topic_exists(name: str) -> bool:
    return Topic.objects.filter(name=name).exists()


def _session_user_id(session_key: str | None) -> int | None:
    """The active user the session ``session_key`` logs in now, read afresh from the session store and
    decided as for an HTTP request (expiry, the password's session hash, the backend); None when none."""
    if not session_key:
        return None
    request = HttpRequest()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(request)
    return user.pk if user.is_authenticated and user.is_active else None


def _user_active(user_id: int) -> bool:
    return auth.get_user_model().objects.filter(pk=user_id, is_active=True).exists()

"""A live page's WebSocket ends with its user's session: when the user logs out, is deactivated or is
deleted, every socket of that user closes at once, with code 4401 (``consumers.UNAUTHORIZED``).

Each socket joins its user's channel layer group (``user_group``). A logout, from any session of the
user, closes all of them (a page whose own session is still valid reconnects; one whose session ended is
refused). A save or a delete of the user asks each of them to verify its session again, once the change
is committed, so that it reads the new row: a deactivated or deleted user, or a changed password (which
ends the user's other sessions), closes them. These signals work from any process with the channel layer
(the console, ``manage.py shell``); sockets also verify on their own, for what no signal announces.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
CLOSE = "session.close"  # the consumer closes
VERIFY = "session.verify"  # the consumer verifies its session, and closes when it no longer logs the user in
SEND_TIMEOUT_S = 5.0


def user_group(user_id: int) -> str:
    """The channel layer group of one user's sockets."""
    return f"user.{user_id}"


def tell_sockets(user_id: int, kind: str) -> None:
    layer = get_channel_layer()
    if layer is None:
        return

    def send() -> None:
        try:
            async_to_sync(layer.group_send)(user_group(user_id), {"type": kind})
        except (OSError, RedisError) as exc:  # the logout or the save goes on; the sockets' checks remain
            log.warning("could not tell user %s's WebSockets to %s: %s", user_id, kind.split(".")[1], exc)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: a view, the admin, a management command
        send()
        return
    # An event loop runs in this thread (a notebook, code run with DJANGO_ALLOW_ASYNC_UNSAFE), where
    # async_to_sync refuses to run: the message goes from a thread of its own.
    sender = threading.Thread(target=send, name="fd-ws-signal")
    sender.start()
    sender.join(timeout=SEND_TIMEOUT_S)


def on_logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        tell_sockets(user.pk, CLOSE)


def on_user_saved(sender, instance, created, update_fields=None, using=None, **kwargs) -> None:
    if created or update_fields == frozenset({"last_login"}):  # a login changes nothing a socket relies on
        return
    user_id = instance.pk
    transaction.on_commit(lambda: tell_sockets(user_id, VERIFY), using=using)


def on_user_deleted(sender, instance, using=None, **kwargs) -> None:
    user_id = instance.pk  # gone from the instance once the delete is done
    transaction.on_commit(lambda: tell_sockets(user_id, VERIFY), using=using)


def connect() -> None:
    user_model = get_user_model()
    user_logged_out.connect(on_logged_out, dispatch_uid="fd-ws-logged-out")
    post_save.connect(on_user_saved, sender=user_model, dispatch_uid="fd-ws-user-saved")
    post_delete.connect(on_user_deleted, sender=user_model, dispatch_uid="fd-ws-user-deleted")

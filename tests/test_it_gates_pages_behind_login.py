"""Every page but the login page needs a logged-in user; the WebSocket refuses anonymous users."""

import pytest
from asgiref.sync import async_to_sync

pytestmark = pytest.mark.django_db(transaction=True)


def test_anonymous_visitors_are_sent_to_the_login_page(client):
    answer = client.get("/")
    assert answer.status_code == 302 and answer["Location"].startswith("/login/")
    assert client.get("/login/").status_code == 200


def test_the_landing_page_lists_topics_and_nodes(client, node, store):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("ops", password="ops-password-1")
    assert client.post("/login/", {"username": "ops", "password": "ops-password-1"}).status_code == 302
    page = client.get("/").content.decode()
    assert "default" in page and "node-a" in page
    assert "dead" in page  # node-a has never sent a heartbeat
    assert user.is_authenticated


def test_an_empty_console_says_how_to_start(client, db, store):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_user("ops"))
    page = client.get("/").content.decode()
    assert "No nodes yet" in page and "fdnode" in page


def test_websocket_refuses_anonymous_and_feeds_logged_in_users(node, store):
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth import get_user_model

    from fdconsole.asgi import application

    async def anonymous():
        origin = [(b"origin", b"http://localhost")]
        communicator = WebsocketCommunicator(application, "/ws/cluster/", headers=origin)
        connected, _ = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert async_to_sync(anonymous)() is False

    user = get_user_model().objects.create_user("ops")

    async def logged_in():
        from fdconsole.dashboard.consumers import LiveConsumer

        communicator = WebsocketCommunicator(LiveConsumer.as_asgi(), "/ws/cluster/")
        communicator.scope["user"] = user
        connected, _ = await communicator.connect()
        message = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return connected, message

    connected, message = async_to_sync(logged_in)()
    assert connected and message["type"] == "cluster"
    assert [n["name"] for n in message["nodes"]] == ["node-a"]

"""``manage.py fdnode``: clear errors for bad names and devices; --burst runs the queue and exits."""

import pytest
import torch
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_bad_node_name_is_refused(store):
    with pytest.raises(CommandError, match="name must be 1-64 letters"):
        call_command("fdnode", "--name", "bad name!")


def test_a_node_of_another_topic_is_refused(node, store):
    with pytest.raises(CommandError, match="belongs to topic 'default'"):
        call_command("fdnode", "--name", "node-a", "--topic", "other")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_refused(store):
    with pytest.raises(CommandError, match="cuda"):
        call_command("fdnode", "--name", "gpu-node", "--device", "cuda")


def test_burst_runs_queued_work_then_exits(api, node, store):
    answer = api.post("/api/v1/topics/default/requests", {"prompt": "burst", "max_tokens": 3})
    call_command("fdnode", "--name", "node-a", "--burst")
    body = api.get(f"/api/v1/requests/{answer.json()['request_id']}").json()
    assert body["status"] == "finished" and body["executed_by"] == "node-a"


def test_a_new_node_creates_its_topic_and_record(store):
    from fdconsole.nodes.models import Node

    call_command("fdnode", "--name", "fresh-1", "--topic", "fresh", "--role", "decode", "--burst")
    node = Node.objects.get(name="fresh-1")
    assert node.topic.name == "fresh" and node.role == "decode" and node.host

"""Each node's engine capacity lives on its record: EngineCapacity's defaults, validated by its check
(errors on the field at fault, in full_clean and in the admin form), and shown by the node API."""

from __future__ import annotations

from dataclasses import fields

import pytest
from django.core.exceptions import ValidationError

from gpu_worker.capacity import CPU_KV_CACHE_MB, MAX_BLOCK_SIZE, EngineCapacity

CHANGED = {"max_num_seqs": 7, "max_num_batched_tokens": 300, "num_kv_blocks": 40, "kv_cache_memory_mb": 64,
           "block_size": 8, "reserved_output_blocks": 2, "enable_prefix_caching": False}
BAD = [
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": MAX_BLOCK_SIZE + 1}, "block_size"),
    ({"block_size": 4096}, "block_size"),
    ({"num_kv_blocks": 1, "reserved_output_blocks": 1}, "num_kv_blocks"),
    ({"num_kv_blocks": 3, "reserved_output_blocks": 5}, "num_kv_blocks"),
]


def record(name: str):
    from fdconsole.nodes.models import Node

    return Node.objects.get(name=name)


def node_form(node, **changes) -> dict:
    """The admin change form's fields as the page would post them; an unchecked box is left out."""
    from fdconsole.nodes.models import CAPACITY_FIELDS

    data = {"name": node.name, "topic": node.topic_id, "role": node.role, "device": node.device,
            "admin_state": node.admin_state, **{name: getattr(node, name) for name in CAPACITY_FIELDS}}
    data.update(changes)
    return {k: ("on" if v is True else v) for k, v in data.items() if v is not False}


# -- the record --------------------------------------------------------------------------------------
def test_the_capacity_fields_are_engine_capacitys_fields_with_its_defaults():
    from fdconsole.nodes.models import CAPACITY_FIELDS, Node

    assert CAPACITY_FIELDS == tuple(f.name for f in fields(EngineCapacity))
    assert {name: Node._meta.get_field(name).default for name in CAPACITY_FIELDS} == \
        {f.name: f.default for f in fields(EngineCapacity)}
    assert Node().capacity() == EngineCapacity()


def test_the_help_texts_give_the_unit_and_what_0_means():
    from fdconsole.nodes.models import Node

    def help_text(name: str) -> str:
        return str(Node._meta.get_field(name).help_text)

    assert "0 = " in help_text("num_kv_blocks") and "blocks" in help_text("num_kv_blocks")
    assert f"0 = {CPU_KV_CACHE_MB} MiB" in help_text("kv_cache_memory_mb")
    assert "tokens" in help_text("block_size") and str(MAX_BLOCK_SIZE) in help_text("block_size")
    assert "tokens" in help_text("max_num_batched_tokens")


def test_capacity_maps_every_field_of_the_record(node):
    from fdconsole.nodes.models import Node

    Node.objects.filter(pk=node.pk).update(**CHANGED)
    assert record("node-a").capacity() == EngineCapacity(**CHANGED)


def test_a_node_made_by_ensure_node_gets_the_default_capacity(node):
    assert node.capacity() == EngineCapacity()
    node.full_clean()


@pytest.mark.parametrize("changes, field", BAD)
def test_full_clean_refuses_a_capacity_that_cannot_work_naming_the_field(node, changes, field):
    for name, value in changes.items():
        setattr(node, name, value)
    with pytest.raises(ValidationError) as refused:
        node.full_clean()
    assert list(refused.value.message_dict) == [field], refused.value.message_dict
    assert refused.value.message_dict[field][0].startswith(("must", f"{changes[field]} blocks"))


def test_full_clean_still_checks_the_name_and_names_both_faults_at_once(node):
    node.name = "a b"
    with pytest.raises(ValidationError) as refused:
        node.full_clean()
    assert list(refused.value.message_dict) == ["name"]
    node.block_size = 0
    with pytest.raises(ValidationError) as refused:
        node.full_clean()
    assert sorted(refused.value.message_dict) == ["block_size", "name"]


def test_full_clean_accepts_a_capacity_that_works(node):
    for name, value in CHANGED.items():
        setattr(node, name, value)
    node.full_clean()


# -- the admin ---------------------------------------------------------------------------------------
def test_the_change_page_groups_the_capacity_fields_and_says_when_they_apply(admin, node):
    from fdconsole.nodes.models import CAPACITY_FIELDS

    answer = admin.get(f"/admin/nodes/node/{node.pk}/change/")
    assert answer.status_code == 200
    [capacity] = [f for f in answer.context["adminform"] if f.name == "Capacity"]
    assert tuple(capacity.fields) == CAPACITY_FIELDS
    page = answer.content.decode()
    assert "Capacity" in page and "(re)starts" in page
    assert all(f'name="{name}"' in page for name in CAPACITY_FIELDS)


def test_the_node_list_shows_max_num_seqs_and_block_size(admin, node):
    page = admin.get("/admin/nodes/node/").content.decode()
    assert "column-max_num_seqs" in page and "column-block_size" in page


def test_the_admin_saves_a_capacity_that_works(admin, node):
    answer = admin.post(f"/admin/nodes/node/{node.pk}/change/", node_form(node, **CHANGED))
    assert answer.status_code == 302, answer.context and answer.context["adminform"].form.errors
    assert record("node-a").capacity() == EngineCapacity(**CHANGED)


@pytest.mark.parametrize("changes, field", [*BAD, ({"num_kv_blocks": -1}, "num_kv_blocks"),
                                            ({"max_num_seqs": "many"}, "max_num_seqs")])
def test_the_admin_refuses_a_bad_capacity_next_to_the_field(admin, node, changes, field):
    answer = admin.post(f"/admin/nodes/node/{node.pk}/change/", node_form(node, **changes))
    assert answer.status_code == 200  # the form again, not a redirect
    errors = answer.context["adminform"].form.errors
    assert list(errors) == [field], errors
    assert "errorlist" in answer.content.decode()
    assert record("node-a").capacity() == EngineCapacity()


# -- the API -----------------------------------------------------------------------------------------
def test_the_node_api_shows_the_records_capacity(api, node, store):
    from fdconsole.nodes.models import Node

    expected = {f.name: f.default for f in fields(EngineCapacity)}
    assert api.get("/api/v1/nodes/node-a").json()["capacity"] == expected
    Node.objects.filter(pk=node.pk).update(**CHANGED)
    assert api.get("/api/v1/nodes/node-a").json()["capacity"] == CHANGED
    [listed] = api.get("/api/v1/nodes").json()["nodes"]
    assert listed["capacity"] == CHANGED

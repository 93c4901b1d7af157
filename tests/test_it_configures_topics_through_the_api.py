"""Topics' scheduler configuration through /api/v1/topics: every parameter of the user's table with its
default, validated writes that reach Redis, and refused writes that change nothing."""

from __future__ import annotations

import json

import pytest

from tests.api_errors import assert_error

pytestmark = pytest.mark.django_db

# The user's parameter table (shared/SCHEDULERS.md): names and defaults are fixed.
TABLE_DEFAULTS = {
    "scheduler_name": "local",
    "scheduler_max_size": -1,
    "scheduler_ttl": 900,
    "scheduler_host": "127.0.0.1",
    "scheduler_port": 6379,
    "scheduler_db": 0,
    "scheduler_password": "",
    "scheduler_topic": "default",
    "scheduler_min_load_score": 3,
    "scheduler_load_shards_num": 1,
    "scheduler_sync_period": 5,
    "scheduler_expire_period": 3000,
    "scheduler_release_load_expire_period": 600,
    "scheduler_reader_parallel": 4,
    "scheduler_writer_parallel": 4,
    "scheduler_reader_batch_size": 200,
    "scheduler_writer_batch_size": 200,
}
NUMBER_PARAMETERS = [name for name, value in TABLE_DEFAULTS.items() if not isinstance(value, str)]
# Integers only: the periods are seconds with fractions allowed, and the load score is a float.
INT_PARAMETERS = [name for name in NUMBER_PARAMETERS
                  if name != "scheduler_min_load_score" and "period" not in name]


def scheduler_fields(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k.startswith("scheduler_")}


def published(store, topic: str = "default") -> dict | None:
    raw = store.redis.get(f"fd:{{{topic}}}:config")
    return json.loads(raw) if raw is not None else None


# -- reading -----------------------------------------------------------------------------------------
def test_a_topic_shows_every_parameter_of_the_table_with_its_default(api, topic):
    answer = api.get("/api/v1/topics/default")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["name"] == "default"
    assert scheduler_fields(body) == TABLE_DEFAULTS
    for name, default in TABLE_DEFAULTS.items():
        assert type(body[name]) is type(default), (name, body[name])


def test_the_topic_list_shows_every_topic_with_every_parameter(api, topic):
    assert api.post("/api/v1/topics", {"name": "second"}).status_code == 201
    answer = api.get("/api/v1/topics")
    assert answer.status_code == 200, answer.content
    topics = {t["name"]: t for t in answer.json()["topics"]}
    assert set(topics) == {"default", "second"}
    assert scheduler_fields(topics["default"]) == TABLE_DEFAULTS
    assert scheduler_fields(topics["second"]) == {**TABLE_DEFAULTS, "scheduler_topic": "second"}


def test_a_topic_lists_its_nodes(api, node):
    from fdconsole.topics.services import ensure_node

    ensure_node("node-b", node.topic)
    assert api.get("/api/v1/topics/default").json()["nodes"] == ["node-a", "node-b"]


@pytest.mark.parametrize("method", ["get", "patch"])
@pytest.mark.parametrize("name", ["nope", "Default", "default.x"])
def test_an_unknown_topic_is_not_found(api, topic, method, name):
    answer = api.get(f"/api/v1/topics/{name}") if method == "get" else \
        api.patch(f"/api/v1/topics/{name}", {"scheduler_ttl": 5})
    error = assert_error(answer, 404, "topic")
    assert name in error["message"]
    assert topic_names() == ["default"]


# -- creating ----------------------------------------------------------------------------------------
def test_a_topic_is_created_with_its_fields(api, topic, store):
    body = {"name": "fast", "scheduler_ttl": 30, "scheduler_max_size": 10, "scheduler_sync_period": 0.25,
            "scheduler_min_load_score": 4.5, "scheduler_name": "global"}
    answer = api.post("/api/v1/topics", body)
    assert answer.status_code == 201, answer.content
    expected = {**TABLE_DEFAULTS, **{k: v for k, v in body.items() if k != "name"}, "scheduler_topic": "fast"}
    assert answer.json()["name"] == "fast"
    assert scheduler_fields(answer.json()) == expected
    assert scheduler_fields(api.get("/api/v1/topics/fast").json()) == expected
    assert published(store, "fast") == expected


@pytest.mark.parametrize("name", ["a", "A-b_c.9", "x" * 64])
def test_any_valid_topic_name_is_accepted(api, topic, name):
    answer = api.post("/api/v1/topics", {"name": name})
    assert answer.status_code == 201, answer.content
    assert api.get(f"/api/v1/topics/{name}").json()["scheduler_topic"] == name


def test_an_existing_topic_name_is_a_conflict(api, topic, store):
    before = published(store)
    error = assert_error(api.post("/api/v1/topics", {"name": "default", "scheduler_ttl": 5}), 409)
    assert error["field"] == "name" and "'default' already exists" in error["message"]
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == before


def topic_names() -> list[str]:
    from fdconsole.topics.models import Topic

    return list(Topic.objects.order_by("name").values_list("name", flat=True))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing"),
        pytest.param({"name": ""}, id="empty"),
        pytest.param({"name": "a b"}, id="space"),
        pytest.param({"name": "x" * 65}, id="65-chars"),
        pytest.param({"name": 5}, id="number"),
        pytest.param({"name": None}, id="null"),
        pytest.param({"name": ["a"]}, id="list"),
        pytest.param({"name": "a/b"}, id="slash"),
        pytest.param({"name": "a{b}"}, id="braces"),
        pytest.param({"name": "tópico"}, id="non-ascii"),
        pytest.param({"name": "a\n"}, id="trailing-newline"),
        pytest.param({"name": "\na"}, id="leading-newline"),
    ],
)
def test_a_bad_topic_name_is_refused(api, topic, store, body):
    assert_error(api.post("/api/v1/topics", body), 400, "name")
    assert topic_names() == ["default"]
    assert store.redis.smembers("fd:topics") == {b"default"}


@pytest.mark.parametrize("raw", ["", "not json", "[]", '["name", "x"]', '"x"', "5", "null"])
def test_a_create_body_that_is_not_a_json_object_is_refused(api, topic, raw):
    error = assert_error(api.post("/api/v1/topics", raw=raw), 400)
    assert "field" not in error
    assert topic_names() == ["default"]


# (field, value) pairs that the validation rules of SCHEDULERS.md refuse.
INVALID_VALUES = [
    ("scheduler_name", "Local"),
    ("scheduler_name", "fifo"),
    ("scheduler_name", ""),
    ("scheduler_name", 1),
    ("scheduler_ttl", 0),
    ("scheduler_ttl", -1),
    ("scheduler_max_size", 0),
    ("scheduler_max_size", -2),
    ("scheduler_port", 0),
    ("scheduler_port", 65536),
    ("scheduler_port", -1),
    ("scheduler_db", -1),
    ("scheduler_min_load_score", 0.5),
    ("scheduler_min_load_score", 0),
    ("scheduler_load_shards_num", 0),
    ("scheduler_sync_period", 0),
    ("scheduler_sync_period", -1),
    ("scheduler_sync_period", -0.5),
    ("scheduler_expire_period", 0),
    ("scheduler_expire_period", -3000),
    ("scheduler_release_load_expire_period", 0),
    ("scheduler_release_load_expire_period", -1),
    ("scheduler_reader_parallel", 0),
    ("scheduler_writer_parallel", 0),
    ("scheduler_reader_batch_size", 0),
    ("scheduler_writer_batch_size", 0),
    ("scheduler_reader_parallel", -4),
    ("scheduler_writer_batch_size", -200),
    ("scheduler_topic", "other"),
    ("scheduler_topic", ""),
    ("scheduler_topic", "a b"),
    ("scheduler_topic", 5),
    ("scheduler_host", ""),
    ("scheduler_host", "a host"),
    ("scheduler_host", "redis\n"),
    ("scheduler_topic", "fresh\n"),
    ("scheduler_host", 127),
    ("scheduler_password", 1234),
    ("scheduler_password", None),
    ("scheduler_password", "p" * 513),
    *[(name, "5") for name in NUMBER_PARAMETERS],
    *[(name, True) for name in NUMBER_PARAMETERS],
    *[(name, None) for name in NUMBER_PARAMETERS],
    *[(name, [5]) for name in NUMBER_PARAMETERS],
    *[(name, 1.5) for name in INT_PARAMETERS],
]
INVALID = [pytest.param(name, value, id=f"{name}={value!r}") for name, value in INVALID_VALUES]


@pytest.mark.parametrize("field, value", INVALID)
def test_creating_with_an_invalid_value_is_refused_naming_the_field(api, topic, store, field, value):
    scheduler_topic = {} if field == "scheduler_topic" else {"scheduler_topic": "fresh"}
    body = {"name": "fresh", "scheduler_ttl": 60, **scheduler_topic, field: value}
    error = assert_error(api.post("/api/v1/topics", body), 400, field)
    assert error["code"] == "invalid"
    assert topic_names() == ["default"]
    assert api.get("/api/v1/topics/fresh").status_code == 404
    assert published(store, "fresh") is None


@pytest.mark.parametrize("field, value", INVALID)
def test_patching_an_invalid_value_is_refused_and_changes_nothing(api, topic, store, field, value):
    before = published(store)
    error = assert_error(api.patch("/api/v1/topics/default", {"scheduler_ttl": 60, field: value}), 400, field)
    assert error["code"] == "invalid"
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == before == TABLE_DEFAULTS


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"scheduler_ttl": NaN}', "scheduler_ttl"),
        ('{"scheduler_min_load_score": Infinity}', "scheduler_min_load_score"),
        ('{"scheduler_sync_period": NaN}', "scheduler_sync_period"),
        ('{"scheduler_expire_period": -Infinity}', "scheduler_expire_period"),
        ('{"scheduler_port": 1e400}', "scheduler_port"),
    ],
)
def test_non_finite_numbers_are_refused(api, topic, store, raw, field):
    assert_error(api.patch("/api/v1/topics/default", raw=raw), 400, field)
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == TABLE_DEFAULTS


@pytest.mark.parametrize("field", ["scheduler_queue", "name_", "nodes_count", "max_size"])
def test_an_unknown_field_is_refused(api, topic, store, field):
    assert_error(api.post("/api/v1/topics", {"name": "fresh", field: 1}), 400, field)
    assert topic_names() == ["default"]
    assert_error(api.patch("/api/v1/topics/default", {"scheduler_ttl": 60, field: 1}), 400, field)
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == TABLE_DEFAULTS


# -- patching ----------------------------------------------------------------------------------------
def test_a_valid_patch_is_saved_and_published(api, topic, store):
    answer = api.patch("/api/v1/topics/default",
                       {"scheduler_ttl": 2, "scheduler_max_size": 2, "scheduler_sync_period": 0.5})
    assert answer.status_code == 200, answer.content
    expected = {**TABLE_DEFAULTS, "scheduler_ttl": 2, "scheduler_max_size": 2, "scheduler_sync_period": 0.5}
    assert scheduler_fields(answer.json()) == expected
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == expected
    assert published(store) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"scheduler_name": "splitwise"},
        {"scheduler_name": "global", "scheduler_min_load_score": 1, "scheduler_load_shards_num": 16},
        {"scheduler_max_size": -1},
        {"scheduler_max_size": 1},
        {"scheduler_db": 15},
        {"scheduler_expire_period": 0.001, "scheduler_release_load_expire_period": 1.5},
        {"scheduler_reader_parallel": 1, "scheduler_writer_parallel": 1},
        {"scheduler_reader_batch_size": 1, "scheduler_writer_batch_size": 1},
        {"scheduler_ttl": 7.0},
        {"scheduler_topic": "default"},
        {"name": "default", "scheduler_ttl": 3},
    ],
)
def test_a_valid_patch_at_the_bounds_is_accepted(api, topic, store, changes):
    from fdconsole.topics.services import topic_store

    answer = api.patch("/api/v1/topics/default", changes)
    assert answer.status_code == 200, answer.content
    expected = {**TABLE_DEFAULTS, **{k: v for k, v in changes.items() if k != "name"}}
    assert scheduler_fields(answer.json()) == expected
    where = topic_store("default")  # scheduler_db=15 moved the topic to database 15
    assert published(where) == expected
    if where is not store:
        where.redis.flushdb()


@pytest.mark.parametrize("changes", [{"scheduler_port": 1}, {"scheduler_port": 65535},
                                     {"scheduler_host": "redis.internal"}])
def test_connection_parameters_at_the_bounds_are_valid(changes):
    """Valid values; a PATCH to them also needs a Redis that answers there, else it answers 503."""
    from scheduler.config import parse_config

    assert parse_config(changes).as_dict() == {**TABLE_DEFAULTS, **changes}


def test_a_topic_read_back_and_patched_unchanged_stays_the_same(api, topic, locked_redis):
    from fdconsole.topics.services import topic_store

    changed = api.patch("/api/v1/topics/default", {"scheduler_port": locked_redis.port,
                                                   "scheduler_password": "s3cret", "scheduler_ttl": 5})
    assert changed.status_code == 200, changed.content
    shown = api.get("/api/v1/topics/default").json()
    answer = api.patch("/api/v1/topics/default", shown)
    assert answer.status_code == 200, answer.content
    assert scheduler_fields(answer.json()) == scheduler_fields(shown)
    assert published(topic_store("default"))["scheduler_password"] == "s3cret"


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param({"scheduler_sizes": 3}, "scheduler_sizes", id="unknown-field"),
        pytest.param({"scheduler_ttl": 5, "colour": "red"}, "colour", id="unknown-with-valid"),
        pytest.param({"name": "renamed"}, "name", id="rename"),
        pytest.param({"name": "renamed", "scheduler_ttl": 5}, "name", id="rename-with-valid"),
        pytest.param({"name": None}, "name", id="rename-to-null"),
        pytest.param({"scheduler_ttl": 5, "scheduler_port": 0}, "scheduler_port", id="one-bad-of-two"),
    ],
)
def test_a_refused_patch_changes_nothing(api, topic, store, body, field):
    assert_error(api.patch("/api/v1/topics/default", body), 400, field)
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == TABLE_DEFAULTS
    assert topic_names() == ["default"]


@pytest.mark.parametrize("raw", ["", "  ", "not json", "[]", '[{"scheduler_ttl": 5}]', '"x"', "5", "null",
                                 "true", "[" * 100_000 + "]" * 100_000, '{"scheduler_password": "\\ud800"}',
                                 '{"scheduler_host": "h\\udc00"}'])
def test_a_patch_body_that_is_not_a_json_object_is_refused(api, topic, store, raw):
    error = assert_error(api.patch("/api/v1/topics/default", raw=raw), 400)
    assert "field" not in error
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert published(store) == TABLE_DEFAULTS


# -- the password ------------------------------------------------------------------------------------
def test_the_password_is_never_shown_and_the_mask_leaves_it_unchanged(api, topic, store, locked_redis):
    from fdconsole.topics.models import Topic
    from fdconsole.topics.services import topic_store

    answer = api.patch("/api/v1/topics/default", {"scheduler_port": locked_redis.port,
                                                  "scheduler_password": "hunter2-secret"})
    assert answer.status_code == 200, answer.content
    mask = answer.json()["scheduler_password"]
    assert mask and "hunter2" not in mask and "secret" not in mask
    for shown in (answer, api.get("/api/v1/topics/default"), api.get("/api/v1/topics")):
        assert b"hunter2" not in shown.content

    masked_back = api.patch("/api/v1/topics/default", {"scheduler_password": mask, "scheduler_ttl": 9})
    assert masked_back.status_code == 200, masked_back.content
    assert Topic.objects.get(name="default").scheduler_password == "hunter2-secret"
    assert published(topic_store("default"))["scheduler_password"] == "hunter2-secret"
    assert published(topic_store("default"))["scheduler_ttl"] == 9

    back_home = {"scheduler_password": "", "scheduler_port": 6379}  # the console's Redis, no password
    assert api.patch("/api/v1/topics/default", back_home).status_code == 200
    assert published(store)["scheduler_password"] == ""
    assert Topic.objects.get(name="default").scheduler_password == ""
    assert api.get("/api/v1/topics/default").json()["scheduler_password"] == ""


def test_a_created_topic_hides_its_password(api, topic, locked_redis):
    from fdconsole.topics.services import topic_store

    answer = api.post("/api/v1/topics", {"name": "locked", "scheduler_port": locked_redis.port,
                                         "scheduler_password": "pa55word"})
    assert answer.status_code == 201, answer.content
    assert b"pa55word" not in answer.content
    assert b"pa55word" not in api.get("/api/v1/topics/locked").content
    assert published(topic_store("locked"), "locked")["scheduler_password"] == "pa55word"


# -- routing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path",
    [
        ("put", "/api/v1/topics"),
        ("delete", "/api/v1/topics"),
        ("patch", "/api/v1/topics"),
        ("put", "/api/v1/topics/default"),
        ("post", "/api/v1/topics/default"),
        ("delete", "/api/v1/topics/default"),
        ("get", "/api/v1/topics/default/requests"),
        ("delete", "/api/v1/topics/default/requests"),
        ("post", "/api/v1/nodes"),
        ("delete", "/api/v1/nodes/node-a"),
        ("put", "/api/v1/requests/x"),
        ("post", "/api/v1/requests/x"),
        ("post", "/api/v1/requests/x/stream"),
    ],
)
def test_a_wrong_method_is_refused_with_405(api, node, store, method, path):
    if method == "get":
        answer = api.get(path)
    else:
        send = getattr(api.client, method)
        answer = send(path, data='{"scheduler_ttl": 5}', content_type="application/json")
    error = assert_error(answer, 405)
    assert error["code"] == "method_not_allowed" and method.upper() in error["message"]
    assert scheduler_fields(api.get("/api/v1/topics/default").json()) == TABLE_DEFAULTS
    assert topic_names() == ["default"]


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v2/topics", "/api/", "/api/v1/topics/default/x",
                                  "/api/v1/topics/", "/api/v1/nodes/node-a/extra"])
def test_an_unknown_api_url_is_a_json_404(api, topic, path):
    assert_error(api.get(path), 404)

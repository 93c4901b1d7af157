"""Load tables are sharded by CRC-16/CCITT-FALSE of the node name, the same in Python and in the Lua
scripts, and a change of the shard count moves every score to its new table."""

import pytest

from scheduler import keys
from scheduler.config import parse_config
from scheduler.loadtable import crc16_ccitt_false, shard_of
from scheduler.messages import Request
from scheduler.store import RequestStore, new_uid

NAMES = ["node-a", "node-b", "gpu-7.host.example", "x", "Z_9", "a-very-long-node-name-" + "q" * 40]


def test_the_crc_is_ccitt_false():
    assert crc16_ccitt_false(b"123456789") == 0x29B1  # the standard check value
    assert crc16_ccitt_false(b"") == 0xFFFF


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_lua_puts_each_node_in_the_table_python_expects(redis_conn, shards):
    store = RequestStore(redis_conn)
    config = parse_config({"scheduler_name": "global", "scheduler_topic": "s",
                           "scheduler_load_shards_num": shards})
    store.publish_config("s", config)
    for i, name in enumerate(NAMES):
        for _ in range(i + 1):
            store.submit("s", new_uid(), Request(new_uid(), [1]), name, config)
    for i, name in enumerate(NAMES):
        assert redis_conn.zscore(keys.load_table("s", shard_of(name, shards)), name) == i + 1


def test_a_new_shard_count_moves_every_score(redis_conn):
    store = RequestStore(redis_conn)
    config = parse_config({"scheduler_name": "global", "scheduler_topic": "s"})
    store.publish_config("s", config)
    for i, name in enumerate(NAMES):
        for _ in range(i + 1):
            store.submit("s", new_uid(), Request(new_uid(), [1]), name, config)
    store.publish_config("s", config.replace({"scheduler_load_shards_num": 5}))
    for i, name in enumerate(NAMES):
        assert redis_conn.zscore(keys.load_table("s", shard_of(name, 5)), name) == i + 1
    total = sum(redis_conn.zcard(keys.load_table("s", shard)) for shard in range(5))
    assert total == len(NAMES)  # each node in exactly one table: nothing left behind in the old one

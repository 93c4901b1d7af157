"""Load-table sharding: a node's shard is CRC-16/CCITT-FALSE of its name modulo the shard count
(compatible with FastDeploy's Global scheduler). The same function runs in Lua (``lua/helpers.lua``) so
that a change of the shard count can move every score atomically inside Redis."""

from __future__ import annotations


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def shard_of(node: str, shards: int) -> int:
    return crc16_ccitt_false(node.encode()) % shards

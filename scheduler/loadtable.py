"""Load-table sharding: a node's shard is CRC-16/CCITT-FALSE of its name modulo the shard count
(compatible with FastDeploy's Global scheduler). The same function runs in Lua (``LUA_CRC16``) so that
a change of the shard count can move every score atomically inside Redis."""

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


LUA_CRC16 = """
local function crc16(s)
  local crc = 0xFFFF
  for i = 1, #s do
    crc = bit.bxor(crc, bit.lshift(string.byte(s, i), 8))
    for _ = 1, 8 do
      if bit.band(crc, 0x8000) ~= 0 then
        crc = bit.band(bit.bxor(bit.lshift(crc, 1), 0x1021), 0xFFFF)
      else
        crc = bit.band(bit.lshift(crc, 1), 0xFFFF)
      end
    end
  end
  return crc
end
"""

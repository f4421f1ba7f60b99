"""The on-disk format: records, their CRC-32 checksums, the ``CURRENT`` file, the
published-position words, and the checks a torn tail or a record must pass."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import zlib
from typing import (
    Final,
    TypeVar,
)

from safeshm._errors import (
    IncompatibleStoreError,
    StoreCorruptedError,
)

V = TypeVar("V")


T = TypeVar("T")


StrPath = str | os.PathLike[str]


# --- on-disk format -------------------------------------------------------------------------
FORMAT_VERSION: Final = 1


_MAGIC: Final = b"\xa7S"


# magic, type, flags, key length, value length, CRC-32 of the body, CRC-32 of the first 16
# header bytes. Little-endian, no padding: 20 bytes.
_HDR: Final = struct.Struct("<2sBBIIII")


HEADER_BYTES: Final = _HDR.size


_HDR_CRC_SPAN: Final = 16


_SUB: Final = struct.Struct("<BII")  # one operation inside a TXN body: type, klen, vlen


_GEN: Final = struct.Struct("<Q")


HEADER: Final = 1


SET: Final = 2


DEL: Final = 3


TXN: Final = 4


MOVED: Final = 5


_TYPE_NAMES: Final = {HEADER: "HEADER", SET: "SET", DEL: "DEL", TXN: "TXN", MOVED: "MOVED"}


# One record is written with one write(); keep it far below what a write() may split.
MAX_RECORD: Final = 1 << 30


CURRENT_FILE: Final = "CURRENT"


WRITE_LOCK_FILE: Final = "write.lock"


MAINTENANCE_LOCK_FILE: Final = "maintenance.lock"


_LOG_PREFIX: Final = "data."


_LOG_SUFFIX: Final = ".log"


_TMP_SUFFIX: Final = ".tmp"


# Values up to this size stay in the index, so a get costs no read system call.
_CACHE_LIMIT: Final = 4096


# Compact when the log is larger than this and more than twice the live data.
COMPACT_MIN_BYTES: Final = 4 << 20


_OPEN_RETRIES: Final = 100


_LOCK_FILE_BYTES: Final = 64


# A published position: the generation in the high 24 bits, the log's end in the low 40
# (one aligned 64-bit word, so a reader never sees one half old and the other new).
_POS_BITS: Final = 40


_POS_MASK: Final = (1 << _POS_BITS) - 1


_MIX: Final = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads every bit of a word


_WORD: Final = (1 << 64) - 1


def _check_word(stamp: int, position: int, synced: int) -> int:
    # Multiplying by an odd constant is a bijection of 64-bit words: a change in any bit of
    # position or synced (rotated, so the two do not cancel) changes the result.
    return (((position ^ (synced << 32) ^ (synced >> 32)) * _MIX) ^ stamp) & _WORD


def _pack(generation: int, end: int) -> int:
    """``position`` for ``(generation, end)``; 0 (never trusted) if it does not fit."""
    if end > _POS_MASK or not 0 < generation < 1 << 24:
        return 0
    return generation << _POS_BITS | end


def _read_boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""  # unknown: published positions are never trusted


_BOOT_ID: Final = _read_boot_id()


def _stamp_of(st: os.stat_result) -> int:
    """What a published position is valid for: this boot of the machine and this very log
    file. A reboot (the mapped page may hold anything), a copy of the store (another
    inode) or another generation (another file) all change it. 0: never trusted."""
    if not _BOOT_ID:
        return 0
    data = b"%s:%d:%d" % (_BOOT_ID, st.st_dev, st.st_ino)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


_O_FLAGS: Final = os.O_CLOEXEC | os.O_NOFOLLOW


_crc32: Final = zlib.crc32


_pack_hdr: Final = _HDR.pack


_unpack_hdr: Final = _HDR.unpack_from


def log_name(generation: int) -> str:
    return f"{_LOG_PREFIX}{generation:016x}{_LOG_SUFFIX}"


def _generation_of(filename: str) -> int | None:
    if not (filename.startswith(_LOG_PREFIX) and filename.endswith(_LOG_SUFFIX)):
        return None
    digits = filename[len(_LOG_PREFIX) : -len(_LOG_SUFFIX)]
    if len(digits) != 16:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


def _is_our_file(filename: str) -> bool:
    return (
        filename in (CURRENT_FILE, WRITE_LOCK_FILE, MAINTENANCE_LOCK_FILE)
        or _generation_of(filename) is not None
        or (
            filename.startswith((_LOG_PREFIX, CURRENT_FILE + "."))
            and filename.endswith(_TMP_SUFFIX)
        )
    )


def encode_record(rtype: int, key: bytes, value: bytes) -> bytes:
    """One record: header and body, ready for a single ``write()``."""
    body = key + value
    head = _pack_hdr(_MAGIC, rtype, 0, len(key), len(value), _crc32(body), 0)
    return head[:_HDR_CRC_SPAN] + _crc32(head[:_HDR_CRC_SPAN]).to_bytes(4, "little") + body


def _encode_txn(ops: list[tuple[int, bytes, bytes]]) -> bytes:
    parts: list[bytes] = []
    for rtype, key, value in ops:
        parts += (_SUB.pack(rtype, len(key), len(value)), key, value)
    return encode_record(TXN, b"", b"".join(parts))


def _current_text(generation: int) -> bytes:
    line = f"safeshm-store {FORMAT_VERSION} {generation:016x}"
    return f"{line} {_crc32(line.encode()):08x}\n".encode()


def _parse_current(data: bytes, where: str) -> int:
    try:
        magic, version, gen_hex, crc_hex = data.decode("ascii").split()
        line = f"{magic} {version} {gen_hex}"
        if magic != "safeshm-store" or int(crc_hex, 16) != _crc32(line.encode()):
            raise ValueError(line)
        if int(version) != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{where} is a SafeFileStore of format {version}, expected format {FORMAT_VERSION}"
            )
        return int(gen_hex, 16)
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, IncompatibleStoreError):
            raise
        raise StoreCorruptedError(
            f"{where}: {CURRENT_FILE} is damaged (checksum or format does not match)"
        ) from None


def _key_bytes(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("store keys must be non-empty")
    try:
        return key.encode()
    except UnicodeEncodeError:
        raise ValueError(f"store key {key!r} is not encodable as UTF-8") from None


def _check_size(key: bytes, value: bytes) -> None:
    if HEADER_BYTES + len(key) + len(value) > MAX_RECORD:
        raise ValueError(
            f"a record of {len(key) + len(value)} bytes is larger than a store "
            f"takes ({MAX_RECORD} bytes)"
        )


# --- verification (safeshm store check / dump) ----------------------------------------------
def _torn_tail(rest: memoryview) -> str | None:
    """Classify data that starts with a record that did not check out, read while no
    writer is active: ``None`` if it is a whole valid record after all, ``"torn"`` if it is
    what a killed writer leaves (a prefix of one record, or zeros), ``"corrupt"`` if not."""
    view = rest
    if len(rest) < HEADER_BYTES:
        return "torn"
    magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(view, 0)
    if magic != _MAGIC or _crc32(view[:_HDR_CRC_SPAN]) != head_crc:
        return "torn" if not rest.tobytes().strip(b"\0") else "corrupt"
    end = HEADER_BYTES + klen + vlen
    if end > len(rest):
        return "torn"
    if _crc32(view[HEADER_BYTES:end]) == body_crc:
        return None
    return "torn" if end == len(rest) else "corrupt"


def _record_length(data: bytes, pos: int) -> int:
    """The length of the record at ``pos`` if it checks out completely, else 0."""
    if len(data) - pos < HEADER_BYTES:
        return 0
    magic, _rtype, _flags, klen, vlen, body_crc, head_crc = _unpack_hdr(data, pos)
    end = pos + HEADER_BYTES + klen + vlen
    if (
        magic != _MAGIC
        or _crc32(data[pos : pos + _HDR_CRC_SPAN]) != head_crc
        or end > len(data)
        or _crc32(memoryview(data)[pos + HEADER_BYTES : end]) != body_crc
    ):
        return 0
    return int(end - pos)


def _next_record(data: bytes, pos: int) -> int:
    """The offset of the next record from ``pos`` on that checks out (``len(data)``: none)."""
    while True:
        pos = data.find(_MAGIC, pos)
        if pos < 0:
            return len(data)
        if _record_length(data, pos):
            return pos
        pos += 1


def _ops_of(rtype: int, body: memoryview, klen: int) -> list[tuple[int, bytes, bytes]]:
    """The operations of a record's body (``SET``/``DEL``: one; ``TXN``: each). For a
    damaged record, as many as can be parsed."""
    if rtype in (SET, DEL):
        return [(rtype, bytes(body[:klen]), bytes(body[klen:]))]
    ops: list[tuple[int, bytes, bytes]] = []
    if rtype == TXN:
        pos = klen
        while len(body) - pos >= _SUB.size:
            sub, sklen, svlen = _SUB.unpack_from(body, pos)
            start, stop = pos + _SUB.size, pos + _SUB.size + sklen + svlen
            if sub not in (SET, DEL) or stop > len(body):
                break
            ops.append((sub, bytes(body[start : start + sklen]), bytes(body[start + sklen : stop])))
            pos = stop
    return ops


def _keys_of(ops: list[tuple[int, bytes, bytes]]) -> tuple[str, ...]:
    keys: list[str] = []
    for _rtype, key, _value in ops:
        with contextlib.suppress(UnicodeDecodeError):
            if key and key.decode() not in keys:
                keys.append(key.decode())
    return tuple(keys)

"""RateLimitTable: the shared-memory table behind the ``shm://`` rate-limit storage.

It does not import ``limits``: ``safeshm ls`` / ``inspect`` can show it anywhere.

Layout (offsets in bytes; every field is an 8-byte word)::

    0     segment header (128); its params: keys, key_bytes, entries, and the 16-byte
          random seed (drawn at creation) that keys the slot hash (BLAKE2b)
    128   robust mutex block (128): every operation holds it
    256   control (512): journal record count, generation, longest probe, slots ever
          used, arena pairs in rings, full-error count, one free-list head per block size
    768   undo journal
    ...   slots: ``2 * keys`` of them, each 12 words + the key's bytes:
            +0 hash (0: never used)    +1 generation   +2 key length
            +3 count (fixed window)    +4 expires at (float, time.time())
            +5 ring block (pair index + 1; 0: none)    +6 ring capacity (pairs)
            +7 head (newest pair)      +8 pairs held   +9 units ever acquired
            +10 units before the oldest pair held      +11 ring expires at (float)
    ...   arena: ``entries`` pairs (acquisition time: float, units after it: int)
    ...   block tags: one byte per pair, ``c + 1`` where a free block of ``2**c`` pairs
          starts (0 elsewhere)

Moving windows keep one pair per acquisition (its time and the running total of units
after it) in a ring of ``2**k`` pairs from the arena, so finding the
``limit - amount``-th newest unit is a binary search, whatever ``amount`` is. A ring
starts at one pair; when it is full and its oldest pair is still in the window, it moves
to a ring twice as large (up to ``2**k >= limit``, which holds every pair that can
count); a pair that left the window is overwritten.

The arena is a buddy allocator: a block of ``2**c`` pairs starts at a multiple of
``2**c``; free blocks are on one doubly linked list per size (the links are the block's
first pair) and tagged in the tag bytes. A larger free block is split when no exact one is
free; a freed block is merged with its buddy (the other half of the block twice as large)
while that is free, so once the rings that split a region are gone the region is whole
again. A full ring whose buddy is free doubles in place, so one key can grow to the whole
arena. A ``reset()`` only bumps the generation; the rings of older generations are freed
as their slots are reused or when room is needed.

Crash safety: an operation saves every word it is about to change into the undo journal
(the record first, then the record count: one store), changes them, and commits by
setting the record count to zero. Whoever takes the mutex next and finds records -- the
holder was SIGKILLed, or an exception escaped half-way -- puts the saved words back in
reverse order: the table is exactly as before the interrupted operation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final, Self, TypeVar

from safeshm._errors import (
    IncompatibleSegmentError,
    SafeShmError,
    SegmentCorruptedError,
)
from safeshm._lock import (
    MUTEX_BLOCK,
    Held,
    RobustMutex,
    init_mutex,
)
from safeshm._protocols import SHM_GUARANTEES, Guarantees
from safeshm._segment import HEADER_SIZE, Kind, Segment, SharedStructure
from safeshm._timeout import check_timeout

_T = TypeVar("_T")

DEFAULT_KEYS: Final = 4096
DEFAULT_KEY_BYTES: Final = 256
DEFAULT_ENTRIES: Final = 65536
MAX_KEYS: Final = 1 << 24
MAX_KEY_BYTES: Final = 4096
MAX_ENTRIES: Final = 1 << 28
DEFAULT_LOCK_TIMEOUT: Final = 5.0
"""Seconds an operation waits for the table's lock before raising
:class:`~safeshm.LockTimeoutError`. Operations hold it for microseconds (a ``reset()``
of a million keys: a fraction of a second), so only a frozen holder (SIGSTOP, a
debugger) makes anyone wait this long; it is well under gunicorn's default 30-s worker
timeout, so the request gets a typed error (and flask-limiter's fallback) first."""

_MUTEX_OFFSET: Final = HEADER_SIZE
_CONTROL: Final = (HEADER_SIZE + MUTEX_BLOCK) // 8  # word 32
_JCOUNT: Final = _CONTROL
_GEN: Final = _CONTROL + 1
_MAXPROBE: Final = _CONTROL + 2
_USED: Final = _CONTROL + 3
_INUSE: Final = _CONTROL + 4  # arena pairs in rings (expired ones not yet freed included)
_FULLS: Final = _CONTROL + 5
_RHINT: Final = _CONTROL + 6  # float: no ring expires before (0: unknown)
_SHINT: Final = _CONTROL + 7  # float: no live slot dies before (0: unknown)
_FREE: Final = _CONTROL + 8  # 48 free-list heads (block + 1; 0: empty), by log2 of the size
_NCLASSES: Final = 48
_JOURNAL: Final = _CONTROL + 64  # word 96, byte 768
_JOURNAL_EXTRA_WORDS: Final = 4096
"""Journal room beyond a slot's words: an operation frees at most two rings and allocates
one, and each of those merges or splits at most once per block size (29 sizes up to
``MAX_ENTRIES``, about 10 words each)."""

# slot fields
_HASH, _SGEN, _KLEN, _COUNT, _EXP, _RING, _RCAP, _HEAD, _NP, _TOTAL, _BASE, _REXP = range(12)
_SLOT_FIXED: Final = 12

_PARAMS: Final = struct.Struct("=QQQ16s")
"""Header params: keys, key_bytes, entries, and the seed of the keyed slot hash."""
_SEED_BYTES: Final = 16
_DIGEST_BYTES: Final = 32
_SLOTS_PER_KEY: Final = 2
"""Slots per key of capacity: at most half full while ``keys`` keys are live, so probes
stay short."""
_INSTALL_PROBES: Final = 256
"""A new key takes a free slot at most this far from its hash's home, so that a lookup
never probes more than this many slots, however full the table is."""


class RateLimitTableFullError(SafeShmError, RuntimeError):
    """A :class:`RateLimitTable` has no room left for a new key, or for a moving window's
    entries, and everything it holds is still live: nothing was changed. Its capacity is
    fixed at creation (``keys=`` / ``entries=``); create it larger."""


class _ArenaFull(Exception):
    """Internal: no free ring of the size needed; reclaim expired rings and retry."""


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimitStatistics:
    """A snapshot of a :class:`RateLimitTable` (see :meth:`RateLimitTable.statistics`)."""

    name: str
    keys: int
    """Capacity: how many keys the table is sized for (at least this many can be live at
    once)."""
    live_keys: int
    """Keys whose counter or moving window has not expired."""
    slots_ever_used: int
    key_bytes: int
    entries: int
    """Capacity of the moving-window arena, in (time, total) pairs."""
    entries_reserved: int
    """Arena pairs held by rings now (expired rings not yet freed included)."""
    longest_probe: int
    full_errors: int
    """How many operations were refused with :class:`RateLimitTableFullError`."""
    recoveries: int
    """How many times a process died holding the table's lock (each was rolled back)."""
    creator_pid: int


def _sizes(keys: int, key_bytes: int, entries: int) -> tuple[int, int, int]:
    """``(slot words, journal words, segment size in bytes)``."""
    kw = (key_bytes + 7) // 8
    slot_words = _SLOT_FIXED + kw
    journal_words = slot_words + 2 + 12 + 2 * _NCLASSES + _JOURNAL_EXTRA_WORDS
    words = _JOURNAL + journal_words + _SLOTS_PER_KEY * keys * slot_words + 2 * entries
    return slot_words, journal_words, (words + (entries + 7) // 8) * 8


def _whole_blocks(entries: int) -> list[tuple[int, int]]:
    """The arena as free blocks ``(start, log2 size)``: the largest aligned blocks that
    tile it (one per bit of ``entries``, largest first)."""
    blocks = []
    start = 0
    for c in range(entries.bit_length() - 1, -1, -1):
        if entries >> c & 1:
            blocks.append((start, c))
            start += 1 << c
    return blocks


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, not {value}")
    return value


class RateLimitTable(SharedStructure):
    """Rate-limit counters and moving windows shared by every process on the machine.

    The storage behind ``shm://`` URLs of the ``limits`` library (see
    :mod:`safeshm.ratelimit`); usable directly too. Every operation runs under one
    robust lock and is exact across processes and threads. Capacity is fixed at
    creation: at least ``keys`` keys live at once (the slot array is twice as large, and a
    new key takes a free slot within 256 of its hash's place, so a lookup probes at most
    256 slots whatever the load), keys of up to ``key_bytes`` UTF-8 bytes stored
    as they are (longer ones by a BLAKE2b digest), and ``entries`` moving-window pairs:
    one per acquisition still in its window (a key's ring starts at one pair and doubles
    while full of pairs still in the window, up to the power of two ``>= limit``, so a
    key holds less than twice the most acquisitions it has had in its window at once;
    a ring does not shrink while its window holds a pair). Expired keys
    and rings are reused when room is needed; freed arena blocks merge with their free
    buddies, so a ring of ``2**k`` pairs is refused only when every aligned run of
    ``2**k`` pairs holds a live one. When there is no room, :class:`RateLimitTableFullError`
    is raised and nothing changes. A process killed at any point of an operation leaves
    the table as it was before that operation.

    Times are ``time.time()`` seconds, as in ``limits``.

    Example:
        >>> with RateLimitTable.create(keys=16) as table:
        ...     table.incr("k", 60), table.incr("k", 60, 2), table.get("k")
        (1, 3, 3)
    """

    _KIND = Kind.RATE_LIMITS
    guarantees: ClassVar[Guarantees] = SHM_GUARANTEES
    _LAYOUT = 3  # 3: a buddy allocator (2: unmerged free lists; 1: a crc32 slot hash)
    _MAPPED = ("_q", "_d", "_b", "_mutex", "_held")

    _q: memoryview
    _d: Any  # memoryview of doubles (typeshed types memoryview items as int)
    _b: memoryview
    _mutex: RobustMutex
    _held: Held
    _keys: int
    _nslots: int
    _key_bytes: int
    _entries: int
    _slot_words: int
    _slots_w: int
    _arena_w: int
    _tags: int  # byte offset of the block tags
    _jpos: int
    _seed: bytes
    _hasher: Any  # hashlib.blake2b keyed with _seed, copied per key

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        name: str | None = None,
        keys: int = DEFAULT_KEYS,
        key_bytes: int = DEFAULT_KEY_BYTES,
        entries: int = DEFAULT_ENTRIES,
    ) -> Self:
        """Create a new table.

        Args:
            name: the name to attach by; a random one when ``None``.
            keys: how many keys can be live at once (at least; see above).
            key_bytes: the longest key stored as it is, in UTF-8 bytes (at least 16;
                rounded up to a multiple of 8). A longer key is stored by a digest of
                ``min(32, key_bytes - 1)`` bytes, so any key length works.
            entries: moving-window capacity, in pairs (one per acquisition still in a
                window; a key's ring is the power of two >= the acquisitions it has in
                its window, at most the power of two >= its limit).

        Raises:
            SegmentExistsError: a segment with this name exists.
            ValueError: a capacity is out of range; TypeError: not an int.
        """
        keys = _check_int("keys", keys, 1, MAX_KEYS)
        key_bytes = _check_int("key_bytes", key_bytes, 16, MAX_KEY_BYTES)
        key_bytes = (key_bytes + 7) // 8 * 8
        entries = _check_int("entries", entries, 0, MAX_ENTRIES)
        slot_words, journal_words, size = _sizes(keys, key_bytes, entries)
        arena_w = _JOURNAL + journal_words + _SLOTS_PER_KEY * keys * slot_words
        tags = (arena_w + 2 * entries) * 8

        def init(mm: mmap.mmap) -> None:
            init_mutex(mm, _MUTEX_OFFSET)  # every other word starts at zero
            for start, c in _whole_blocks(entries):  # one block per size: no links
                struct.pack_into("=q", mm, (_FREE + c) * 8, start + 1)
                mm[tags + start] = c + 1

        seg = Segment.create(
            name,
            kind=cls._KIND,
            layout=cls._LAYOUT,
            payload_size=size - HEADER_SIZE,
            init=init,
            params=_PARAMS.pack(keys, key_bytes, entries, os.urandom(_SEED_BYTES)),
        )
        return cls._from_segment(seg)

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing table by name.

        Raises:
            SegmentNotFoundError: no segment has this name.
            IncompatibleSegmentError: the segment is not a ``RateLimitTable``.
        """
        return cls._from_segment(cls._attach_segment(name))

    @classmethod
    def open(
        cls,
        name: str,
        *,
        keys: int | None = None,
        key_bytes: int | None = None,
        entries: int | None = None,
    ) -> Self:
        """Attach to the table ``name``, creating it (race-free) if it does not exist.

        Capacities left ``None`` take the defaults when creating and accept whatever an
        existing table has.

        Raises:
            IncompatibleSegmentError: a capacity was given and the existing table was
                created with another one.
        """

        def check(seg: Segment) -> None:
            have = dict(
                zip(
                    ("keys", "key_bytes", "entries"),
                    _PARAMS.unpack_from(seg.header.params)[:3],
                    strict=True,
                )
            )
            asked = {"keys": keys, "key_bytes": key_bytes, "entries": entries}
            if asked["key_bytes"] is not None:
                asked["key_bytes"] = (asked["key_bytes"] + 7) // 8 * 8
            for opt, want in asked.items():
                if want is not None and have[opt] != want:
                    raise IncompatibleSegmentError(
                        f"RateLimitTable {name!r} exists with {opt}={have[opt]}, not {want}: "
                        f"use that, or remove it first (safeshm rm {name})"
                    )

        return cls._open_segment(
            name,
            lambda: cls.create(
                name=name,
                keys=DEFAULT_KEYS if keys is None else keys,
                key_bytes=DEFAULT_KEY_BYTES if key_bytes is None else key_bytes,
                entries=DEFAULT_ENTRIES if entries is None else entries,
            ),
            check,
        )

    def _bind(self, mm: mmap.mmap) -> None:
        keys, key_bytes, entries, seed = _PARAMS.unpack_from(self._seg.header.params)
        slot_words, journal_words, total = _sizes(keys, key_bytes, entries)
        if key_bytes % 8 or total != self._seg.header.total_size:
            raise SegmentCorruptedError(
                f"RateLimitTable {self._seg.name!r} is damaged: its parameters do not match "
                "its size"
            )
        self._keys = keys
        self._seed = seed
        self._hasher = hashlib.blake2b(digest_size=8, key=seed, person=b"safeshm-slot")
        self._nslots = _SLOTS_PER_KEY * keys
        self._key_bytes = key_bytes
        self._entries = entries
        self._slot_words = slot_words
        self._slots_w = _JOURNAL + journal_words
        self._arena_w = self._slots_w + self._nslots * slot_words
        self._tags = (self._arena_w + 2 * entries) * 8
        self._jpos = _JOURNAL
        view = memoryview(mm)
        self._q = view.cast("q")
        self._d = view.cast("d")
        self._b = view
        self._mutex = RobustMutex(mm, _MUTEX_OFFSET, f"RateLimitTable {self._seg.name!r}")
        self._held = Held(self._mutex, self._undo, DEFAULT_LOCK_TIMEOUT)

    @property
    def lock_timeout(self) -> float | None:
        """Seconds each operation of this handle waits for the table's lock before
        raising :class:`~safeshm.LockTimeoutError` (``None``: forever); default
        :data:`DEFAULT_LOCK_TIMEOUT`. Settable; per handle, not stored in the table."""
        return self._held._timeout

    @lock_timeout.setter
    def lock_timeout(self, value: float | None) -> None:
        seconds = check_timeout(value)
        self._held._timeout = None if seconds == math.inf else seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reattach, (*super().__reduce__()[1], self.lock_timeout))

    # -- the transaction machinery ---------------------------------------------------------
    def _save(self, w: int, n: int) -> None:
        """Journal words ``w .. w+n`` before they change (the record, then its count)."""
        q = self._q
        j = self._jpos
        if j + 2 + n > self._slots_w:  # pragma: no cover - every operation fits by design
            raise SegmentCorruptedError(f"RateLimitTable {self._seg.name!r}: journal overflow")
        q[j] = w
        q[j + 1] = n
        q[j + 2 : j + 2 + n] = q[w : w + n]
        self._jpos = j + 2 + n
        q[_JCOUNT] += 1

    def _undo(self) -> None:
        """Put back what an interrupted operation changed (holding the mutex). Every
        record is checked before any is applied: a damaged journal raises
        :class:`SegmentCorruptedError` and changes nothing."""
        q = self._q
        count = q[_JCOUNT]
        if not count:
            return
        if count < 0:
            raise self._damaged("its undo journal")
        records = []
        j = _JOURNAL
        limit, end = self._slots_w, len(q)  # the journal's end; the segment's
        for _ in range(count):
            if j + 2 > limit:
                raise self._damaged("its undo journal")
            w, n = q[j], q[j + 1]
            if not (
                0 < n <= limit - j - 2 and (_CONTROL <= w <= _JOURNAL - n or limit <= w <= end - n)
            ):
                raise self._damaged("its undo journal")
            records.append((w, n, j + 2))
            j += 2 + n
        for w, n, at in reversed(records):
            q[w : w + n] = q[at : at + n]
        q[_JCOUNT] = 0

    def _run(self, op: Callable[..., _T], *args: object) -> _T:
        """Run ``op(now, *args)`` as one transaction under the mutex."""
        with self._held:
            if self._q[_JCOUNT]:
                self._undo()
            self._jpos = _JOURNAL
            try:
                try:
                    result = op(time.time(), *args)
                except _ArenaFull:
                    self._undo()
                    self._jpos = _JOURNAL
                    now = time.time()
                    try:
                        if now < self._d[_RHINT]:  # no ring can have expired: don't scan
                            raise _ArenaFull from None
                        self._reclaim_rings(now)
                        result = op(time.time(), *args)
                    except _ArenaFull:
                        self._undo()
                        self._q[_FULLS] += 1
                        raise RateLimitTableFullError(
                            f"RateLimitTable {self._seg.name!r}: no room for a moving window "
                            f"in its {self._entries} entries (every ring is live); nothing "
                            "was changed. Create the table with more entries="
                        ) from None
            except BaseException:
                self._undo()
                raise
            self._q[_JCOUNT] = 0  # commit
            return result

    # -- keys and slots --------------------------------------------------------------------
    def _encode(self, key: str) -> tuple[bytes, int]:
        kb = key.encode("utf-8", "surrogatepass")
        if len(kb) > self._key_bytes:
            # A key too long to store is stored by its digest, behind a 0xFF byte (never
            # in UTF-8): no literal key can equal it, and long keys stay distinct (a
            # collision needs ~2**(4 * digest bytes) keys: 2**60 at the least key_bytes).
            size = min(_DIGEST_BYTES, self._key_bytes - 1)
            kb = b"\xff" + hashlib.blake2b(kb, digest_size=size, person=b"safeshm-rl").digest()
        # The slot hash is keyed by the table's random seed: where a key lands cannot be
        # worked out offline, so keys chosen to share a home (to fill the 256 slots a
        # key may take and lock out everyone else homing there) are as rare as random.
        hasher = self._hasher.copy()
        hasher.update(kb)
        return kb, (int.from_bytes(hasher.digest(), "little") >> 2) + 1  # 1 .. 2**62

    def _home(self, h: int) -> int:
        return h % self._nslots

    def _find(self, kb: bytes, h: int) -> int:
        """The word offset of ``kb``'s slot in the current generation, or -1."""
        q, b = self._q, self._b
        gen = q[_GEN]
        n, sw, base = self._nslots, self._slot_words, self._slots_w
        s = self._home(h)
        klen = len(kb)
        for _ in range(min(q[_MAXPROBE], _INSTALL_PROBES) + 1):  # (bounded if damaged)
            w = base + s * sw
            hw = q[w]
            if hw == 0:
                return -1
            if hw == h and q[w + _SGEN] == gen and q[w + _KLEN] == klen:
                k0 = (w + _SLOT_FIXED) * 8
                if b[k0 : k0 + klen] == kb:
                    return w
            s += 1
            if s == n:
                s = 0
        return -1

    def _dead(self, w: int, now: float) -> bool:
        q, d = self._q, self._d
        if q[w] == 0 or q[w + _SGEN] != q[_GEN]:
            return True
        return (q[w + _COUNT] == 0 or d[w + _EXP] <= now) and (
            q[w + _NP] == 0 or d[w + _REXP] <= now
        )

    def _slot(self, now: float, kb: bytes, h: int) -> int:
        """Find ``kb``'s slot or install it in an empty or expired one (journaled)."""
        w = self._find(kb, h)
        if w >= 0:
            return w
        q = self._q
        n, sw, base = self._nslots, self._slot_words, self._slots_w
        home = self._home(h)
        maxprobe = q[_MAXPROBE]
        # Every slot in use and none can have died since the last full scan: refuse now.
        full = q[_USED] == n and now < self._d[_SHINT]
        for dist in range(0 if full else min(n, _INSTALL_PROBES)):
            w = base + ((home + dist) % n) * sw
            if self._dead(w, now):
                break
        else:
            q[_FULLS] += 1
            if not full and q[_USED] == n:  # not journaled: true of the state as committed
                self._d[_SHINT] = self._earliest_death()
            raise RateLimitTableFullError(
                f"RateLimitTable {self._seg.name!r} is full: no free slot for this key "
                f"(keys={self._keys}: {n} slots, a key's within {_INSTALL_PROBES} places); "
                "nothing was changed. Create it with more keys="
            )
        self._save(w, sw)
        if q[w] == 0:
            self._save(_USED, 1)
            q[_USED] += 1
        elif q[w + _RING]:  # an expired ring, or one left by a reset: freed with the slot
            self._free_ring(q[w + _RING] - 1, q[w + _RCAP])
        if dist > maxprobe:
            self._save(_MAXPROBE, 1)
            q[_MAXPROBE] = dist
        q[w + 1 : w + _SLOT_FIXED] = _ZERO_FIELDS
        q[w + _SGEN] = q[_GEN]
        q[w + _KLEN] = len(kb)
        k0 = (w + _SLOT_FIXED) * 8
        self._b[k0 : k0 + len(kb)] = kb
        q[w] = h
        return w

    def _death(self, w: int) -> float:
        """When the (current-generation) slot at ``w`` dies: its counter and its
        moving window have both expired (``-inf``: it holds neither)."""
        q, d = self._q, self._d
        death = -math.inf
        if q[w + _COUNT]:
            death = d[w + _EXP]
        if q[w + _NP]:
            death = max(death, d[w + _REXP])
        return death

    def _note_slot(self, w: int) -> None:
        """Keep the hint "no live slot dies before ``_SHINT``" true after ``w`` changed."""
        death = self._death(w)
        if death < self._d[_SHINT]:
            self._save(_SHINT, 1)
            self._d[_SHINT] = death

    def _earliest_death(self) -> float:
        q = self._q
        gen = q[_GEN]
        earliest = math.inf
        for s in range(self._nslots):
            w = self._slots_w + s * self._slot_words
            if q[w] == 0 or q[w + _SGEN] != gen:
                return -math.inf
            earliest = min(earliest, self._death(w))
        return earliest

    # -- the moving-window arena -----------------------------------------------------------
    def _pair(self, block: int, pos: int) -> int:
        return self._arena_w + 2 * (block + pos)

    def _tag_word(self, block: int) -> int:
        return (self._tags + block) // 8

    def _push(self, block: int, c: int) -> None:
        """Put the free block ``block`` of ``2**c`` pairs at the head of its list."""
        q = self._q
        link = self._pair(block, 0)
        head = self._free_link(q[_FREE + c], c)
        self._save(link, 2)
        self._save(_FREE + c, 1)
        self._save(self._tag_word(block), 1)
        if head:
            self._save(self._pair(head - 1, 0) + 1, 1)
            q[self._pair(head - 1, 0) + 1] = block + 1
        q[link] = head  # next
        q[link + 1] = 0  # prev (0: the list's head)
        q[_FREE + c] = block + 1
        self._b[self._tags + block] = c + 1

    def _damaged(self, what: str) -> SegmentCorruptedError:
        return SegmentCorruptedError(
            f"RateLimitTable {self._seg.name!r} is damaged: {what}; nothing was changed "
            "(remove it: safeshm rm NAME)"
        )

    def _free_link(self, v: int, c: int) -> int:
        """A free-list link (block + 1; 0: none) checked before it is followed: a free
        block of ``2**c`` pairs, tagged so."""
        block = v - 1
        if v and not (
            0 <= block <= self._entries - (1 << c)
            and not block & ((1 << c) - 1)
            and self._b[self._tags + block] == c + 1
        ):
            raise self._damaged(f"a free list (size 2**{c}) links to {v}")
        return v

    def _take(self, block: int, c: int) -> None:
        """Take the free block ``block`` of ``2**c`` pairs off its list. Its first pair
        (the links) is journaled: whoever fills the block overwrites it, and a rollback
        must find the list intact."""
        q = self._q
        link = self._pair(block, 0)
        nxt, prev = self._free_link(q[link], c), self._free_link(q[link + 1], c)
        self._save(link, 2)
        self._save(self._tag_word(block), 1)
        if prev:
            self._save(self._pair(prev - 1, 0), 1)
            q[self._pair(prev - 1, 0)] = nxt
        else:
            self._save(_FREE + c, 1)
            q[_FREE + c] = nxt
        if nxt:
            self._save(self._pair(nxt - 1, 0) + 1, 1)
            q[self._pair(nxt - 1, 0) + 1] = prev
        self._b[self._tags + block] = 0

    def _free_buddy(self, block: int, c: int) -> int:
        """``block``'s buddy (of size ``2**c``) if it is a whole free block, else -1."""
        buddy = block ^ (1 << c)
        if buddy + (1 << c) <= self._entries and self._b[self._tags + buddy] == c + 1:
            return buddy
        return -1

    def _in_use(self, delta: int) -> None:
        self._save(_INUSE, 1)
        self._q[_INUSE] += delta

    def _alloc_ring(self, k: int) -> tuple[int, int]:
        """A free block of ``2**k`` pairs: ``(block, capacity)`` (journaled)."""
        q = self._q
        for c in range(k, _NCLASSES):
            head = self._free_link(q[_FREE + c], c)
            if head:
                block = head - 1
                self._take(block, c)
                for j in range(c - 1, k - 1, -1):  # a larger block: split off upper halves
                    self._push(block + (1 << j), j)
                self._in_use(1 << k)
                return block, 1 << k
        raise _ArenaFull

    def _check_ring(self, block: int, cap: int) -> None:
        """A slot's ring fields, checked before they are used as indexes."""
        if not (0 < cap <= self._entries and not cap & (cap - 1)) or (
            block < 0 or block & (cap - 1) or block + cap > self._entries
        ):
            raise self._damaged(f"a ring of {cap} pairs at {block}")

    def _check_slot_ring(self, w: int) -> None:
        q = self._q
        cap = q[w + _RCAP]
        self._check_ring(q[w + _RING] - 1, cap)
        if not (0 <= q[w + _NP] <= cap and 0 <= q[w + _HEAD] < cap):
            raise self._damaged(f"a ring's head {q[w + _HEAD]} or count {q[w + _NP]}")

    def _free_ring(self, block: int, cap: int) -> None:
        """Give a ring's block back, merged with its buddy while that is free."""
        self._check_ring(block, cap)
        self._in_use(-cap)
        c = cap.bit_length() - 1
        while (buddy := self._free_buddy(block, c)) >= 0:
            self._take(buddy, c)
            block = min(block, buddy)
            c += 1
        self._push(block, c)

    def _reclaim_rings(self, now: float) -> None:
        """Free every expired ring (and those of slots a reset left), each in its own
        committed step (holding the mutex), and note when the next of the others expires."""
        q, d = self._q, self._d
        gen = q[_GEN]
        earliest = math.inf
        for s in range(self._nslots):
            w = self._slots_w + s * self._slot_words
            if q[w] and q[w + _RING]:
                if q[w + _SGEN] != gen or q[w + _NP] == 0 or d[w + _REXP] <= now:
                    self._jpos = _JOURNAL
                    self._save(w + _RING, _REXP - _RING + 1)
                    self._free_ring(q[w + _RING] - 1, q[w + _RCAP])
                    q[w + _RING : w + _REXP + 1] = _ZERO_RING
                    q[_JCOUNT] = 0
                else:
                    earliest = min(earliest, d[w + _REXP])
        self._jpos = _JOURNAL
        d[_RHINT] = earliest  # one store, true of the committed state

    # -- fixed windows ---------------------------------------------------------------------
    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount`` to ``key``'s counter and return the new count; a counter that
        had expired (or did not exist) restarts from zero and expires ``expiry`` seconds
        from now (``limits``' ``MemoryStorage`` semantics)."""
        kb, h = self._encode(key)
        return self._run(self._incr, kb, h, float(expiry), int(amount))

    def _incr(self, now: float, kb: bytes, h: int, expiry: float, amount: int) -> int:
        q, d = self._q, self._d
        w = self._slot(now, kb, h)
        live = q[w + _COUNT] if d[w + _EXP] > now else 0
        new = live + amount
        self._save(w + _COUNT, 2)
        q[w + _COUNT] = new
        if new == amount:
            d[w + _EXP] = now + expiry
        self._note_slot(w)
        return new

    def decr(self, key: str, amount: int = 1) -> int:
        """Subtract ``amount`` from ``key``'s live counter, not below zero; return it."""
        kb, h = self._encode(key)
        return self._run(self._decr, kb, h, int(amount))

    def _decr(self, now: float, kb: bytes, h: int, amount: int) -> int:
        q = self._q
        w = self._find(kb, h)
        if w < 0 or not self._get(now, kb, h):  # (forgets an expired counter)
            return 0
        self._save(w + _COUNT, 1)
        q[w + _COUNT] = new = max(q[w + _COUNT] - amount, 0)
        self._note_slot(w)
        return new

    def get(self, key: str) -> int:
        """``key``'s counter: 0 if it expired or never existed."""
        kb, h = self._encode(key)
        return self._run(self._get, kb, h)

    def _get(self, now: float, kb: bytes, h: int) -> int:
        w = self._find(kb, h)
        if w < 0:
            return 0
        if self._d[w + _EXP] <= now:
            if self._q[w + _COUNT]:
                # Forget a counter seen expired, as MemoryStorage does: a clock stepped
                # back later must not bring it back.
                self._save(w + _COUNT, 1)
                self._q[w + _COUNT] = 0
                self._note_slot(w)
            return 0
        return self._q[w + _COUNT]

    def get_expiry(self, key: str) -> float:
        """When ``key``'s counter expires (``time.time()``); now if it is not live."""
        kb, h = self._encode(key)
        return self._run(self._get_expiry, kb, h)

    def _get_expiry(self, now: float, kb: bytes, h: int) -> float:
        w = self._find(kb, h)
        if w < 0 or self._d[w + _EXP] <= now:
            return now
        expires: float = self._d[w + _EXP]
        return expires

    def clear(self, *keys: str) -> None:
        """Forget ``keys``' counters and moving windows."""
        for kb, h in [self._encode(k) for k in keys]:  # all checked before any change
            self._run(self._clear, kb, h)

    def _clear(self, now: float, kb: bytes, h: int) -> None:
        q = self._q
        w = self._find(kb, h)
        if w < 0:
            return
        self._save(w + _COUNT, _REXP - _COUNT + 1)
        if q[w + _RING]:
            self._free_ring(q[w + _RING] - 1, q[w + _RCAP])
        q[w + _COUNT : w + _REXP + 1] = _ZERO_FROM_COUNT
        self._note_slot(w)

    def reset(self) -> int:
        """Forget every key at once; return how many were live (as ``MemoryStorage``
        counts: the larger of live counters and live moving windows)."""
        return self._run(self._reset)

    def _reset(self, now: float) -> int:
        q, d = self._q, self._d
        counters = windows = 0
        for s in range(self._nslots):
            w = self._slots_w + s * self._slot_words
            if q[w] and q[w + _SGEN] == q[_GEN]:
                counters += q[w + _COUNT] != 0 and d[w + _EXP] > now
                windows += q[w + _NP] != 0 and d[w + _REXP] > now
        self._save(_GEN, 1)
        self._save(_RHINT, 2)  # and _SHINT
        q[_GEN] += 1
        d[_SHINT] = -math.inf  # every slot is free again
        d[_RHINT] = -math.inf  # the old generation's rings are freed when room is needed
        return max(counters, windows)

    def _live(self, now: float) -> int:
        return sum(
            not self._dead(self._slots_w + s * self._slot_words, now) for s in range(self._nslots)
        )

    # -- moving windows --------------------------------------------------------------------
    def _unit_pair(self, w: int, u: int) -> int:
        """Index (0 = newest) of the pair holding absolute unit ``u`` (held units only)."""
        q = self._q
        block, cap, head = q[w + _RING] - 1, q[w + _RCAP], q[w + _HEAD]
        lo, hi = 0, q[w + _NP] - 1  # largest i with cum_end(i) > u; cum_end(0) > u
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if q[self._pair(block, (head - mid) % cap) + 1] > u:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def acquire_entry(self, key: str, limit: int, expiry: float, amount: int = 1) -> bool:
        """Take ``amount`` units of ``key``'s moving window of ``limit`` per ``expiry``
        seconds if they fit; ``False`` (and nothing changes) if they do not.

        Use one ``expiry`` per key (``limits`` does: its keys embed the amount and the
        period). Entries are dropped as they leave the window of the expiry in use at
        the time, so a call with a longer expiry than earlier ones on the same key may
        count fewer units than are really in its window (an undercount, never an error).
        """
        if amount > limit:
            return False
        kb, h = self._encode(key)
        return self._run(self._acquire, kb, h, int(limit), float(expiry), int(amount))

    def _acquire(  # noqa: PLR0917 - called through _run with positional arguments
        self, now: float, kb: bytes, h: int, limit: int, expiry: float, amount: int
    ) -> bool:
        q, d = self._q, self._d
        w = self._find(kb, h)
        if w >= 0 and q[w + _RING]:
            self._check_slot_ring(w)
        if w >= 0 and q[w + _NP]:
            total = q[w + _TOTAL]
            j = limit - amount  # the newest-first index MemoryStorage looks at
            if j < total - q[w + _BASE]:
                i = self._unit_pair(w, total - 1 - j)
                pos = (q[w + _HEAD] - i) % q[w + _RCAP]
                if d[self._pair(q[w + _RING] - 1, pos)] >= now - expiry:
                    return False
        if amount <= 0:
            return True
        w = self._slot(now, kb, h)
        self._save(w + _RING, _REXP - _RING + 1)
        block, cap = q[w + _RING] - 1, q[w + _RCAP]
        if block < 0:
            self._grow(w, 0)  # rings start at one pair
            block, cap = q[w + _RING] - 1, q[w + _RCAP]
        elif (
            q[w + _NP] == cap < limit
            and d[self._pair(block, (q[w + _HEAD] + 1) % cap)] >= now - expiry
        ):
            # Full, and its oldest pair (the one the new pair would overwrite) is still in
            # the window: double the ring (up to the power of two >= limit, which holds
            # every pair that can count). A pair that left the window is overwritten below.
            self._grow(w, cap.bit_length())
            block, cap = q[w + _RING] - 1, q[w + _RCAP]
        head = (q[w + _HEAD] + 1) % cap
        p = self._pair(block, head)
        np_ = q[w + _NP]
        if np_ == cap:  # the oldest pair goes: its units are beyond the limit
            q[w + _BASE] = q[p + 1]
        else:
            q[w + _NP] = np_ + 1
        self._save(p, 2)
        total = q[w + _TOTAL] + amount
        d[p] = now
        q[p + 1] = total
        q[w + _TOTAL] = total
        q[w + _HEAD] = head
        d[w + _REXP] = rexp = max(d[w + _REXP], now + expiry)
        if rexp < d[_RHINT]:
            self._save(_RHINT, 1)
            d[_RHINT] = rexp
        self._note_slot(w)
        return True

    def _grow(self, w: int, k: int) -> None:
        """Give slot ``w`` a ring of ``2**k`` pairs, keeping its pairs: a full ring whose
        buddy is free doubles in place, any other moves to a new block."""
        q = self._q
        old, ocap, head, np_ = q[w + _RING] - 1, q[w + _RCAP], q[w + _HEAD], q[w + _NP]
        if old >= 0 and np_ == ocap == 1 << (k - 1):
            buddy = self._free_buddy(old, k - 1)
            if buddy >= 0:
                # The ring's pairs are, oldest first, positions head+1 .. ocap-1, then
                # 0 .. head. In the doubled block they must run on, so one part moves into
                # the buddy's half (free: only its links, journaled by _take, are state):
                # the newest part up when the ring is the lower half, the oldest part down
                # when it is the upper half. Either way the newest pair ends at ocap+head.
                self._take(buddy, k - 1)
                self._in_use(ocap)
                low = min(old, buddy)
                a, b = (0, head + 1) if buddy > old else (head + 1, ocap)
                src, dst = self._pair(old, a), self._pair(low, a + (ocap if buddy > old else 0))
                q[dst : dst + 2 * (b - a)] = q[src : src + 2 * (b - a)]
                q[w + _RING] = low + 1
                q[w + _RCAP] = 2 * ocap
                q[w + _HEAD] = ocap + head
                return
        block, cap = self._alloc_ring(k)
        if old >= 0:
            # The new block was free before this operation: only its first word (the free
            # list's link, journaled by _alloc_ring) is part of the state.
            for i in range(np_):
                src = self._pair(old, (head - np_ + 1 + i) % ocap)
                dst = self._pair(block, i)
                q[dst : dst + 2] = q[src : src + 2]
            self._free_ring(old, ocap)
        q[w + _RING] = block + 1
        q[w + _RCAP] = cap
        q[w + _HEAD] = (np_ - 1) % cap

    def moving_window(self, key: str, expiry: float) -> tuple[float, int]:
        """``(time of the oldest unit in the window, units in the window)`` of ``key``'s
        moving window of ``expiry`` seconds; ``(now, 0)`` when it is empty.

        Use the same ``expiry`` as :meth:`acquire_entry` on this key (one expiry per key):
        with another one the answer may leave out units dropped under the shorter one.
        """
        kb, h = self._encode(key)
        return self._run(self._window, kb, h, float(expiry))

    def _window(self, now: float, kb: bytes, h: int, expiry: float) -> tuple[float, int]:
        q, d = self._q, self._d
        w = self._find(kb, h)
        if w < 0 or not q[w + _NP]:
            return now, 0
        self._check_slot_ring(w)
        block, cap, head, np_ = q[w + _RING] - 1, q[w + _RCAP], q[w + _HEAD], q[w + _NP]
        edge = now - expiry
        if d[self._pair(block, head)] <= edge:
            return now, 0
        lo, hi = 0, np_ - 1  # the oldest pair newer than the edge
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if d[self._pair(block, (head - mid) % cap)] > edge:
                lo = mid
            else:
                hi = mid - 1
        p = self._pair(block, (head - lo) % cap)
        start = q[self._pair(block, (head - lo - 1) % cap) + 1] if lo + 1 < np_ else q[w + _BASE]
        return d[p], q[w + _TOTAL] - start

    # -- sliding-window counters -----------------------------------------------------------
    @staticmethod
    def sliding_window_keys(key: str, expiry: float, at: float) -> tuple[str, str]:
        """The previous and current window's keys (as ``limits`` names them)."""
        return f"{key}/{int((at - expiry) / expiry)}", f"{key}/{int(at / expiry)}"

    def sliding_window(self, key: str, expiry: float) -> tuple[int, float, int, float]:
        """``(previous count, previous TTL, current count, current TTL)`` of ``key``'s
        sliding-window counter (``limits``' ``get_sliding_window``)."""
        return self._run(self._sliding, key, float(expiry))

    def _sliding(self, now: float, key: str, expiry: float) -> tuple[int, float, int, float]:
        prev, cur = self.sliding_window_keys(key, expiry, now)
        pc = self._get(now, *self._encode(prev))
        cc = self._get(now, *self._encode(cur))
        pttl = 0.0 if pc == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        cttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return pc, pttl, cc, cttl

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: float, amount: int = 1
    ) -> bool:
        """Count ``amount`` into ``key``'s sliding-window counter if the weighted count
        stays within ``limit``; ``False`` (and nothing changes) otherwise."""
        if amount > limit:
            return False
        return self._run(self._acquire_sliding, key, int(limit), float(expiry), int(amount))

    def _acquire_sliding(
        self, now: float, key: str, limit: int, expiry: float, amount: int
    ) -> bool:
        pc, pttl, cc, _ = self._sliding(now, key, expiry)
        if int(pc * pttl / expiry + cc) + amount > limit:  # floor: both terms are >= 0
            return False
        _, cur = self.sliding_window_keys(key, expiry, now)
        self._incr(now, *self._encode(cur), 2 * expiry, amount)
        return True

    def clear_sliding_window(self, key: str, expiry: float) -> None:
        """Forget ``key``'s sliding-window counters (previous and current window)."""
        self.clear(*self.sliding_window_keys(key, expiry, time.time()))

    # -- introspection ---------------------------------------------------------------------
    def check_consistency(self) -> None:
        """Check the table's invariants (for tests and ``safeshm inspect``): no pending
        journal, every ring inside the arena and on no free list, counts in range.

        Raises:
            SegmentCorruptedError: an invariant does not hold (the message says which).
        """
        self._run(self._check)

    def _check_free_blocks(self) -> tuple[dict[int, int], int]:
        """Check the free lists and tags; ``({block: pairs}, free pairs)``."""
        q = self._q
        name = self._seg.name
        spans: dict[int, int] = {}
        free = 0
        for c in range(_NCLASSES):
            head, prev = q[_FREE + c], 0
            while head:
                block = head - 1
                if (
                    not 0 <= block < self._entries
                    or block % (1 << c)
                    or block + (1 << c) > self._entries
                    or block in spans
                    or self._b[self._tags + block] != c + 1
                    or q[self._pair(block, 0) + 1] != prev
                ):
                    raise SegmentCorruptedError(f"{name}: bad free block {block} (size 2**{c})")
                if self._free_buddy(block, c) >= 0:
                    raise SegmentCorruptedError(f"{name}: free block {block}'s buddy is free")
                spans[block] = 1 << c
                free += 1 << c
                prev, head = head, q[self._pair(block, 0)]
        if self._b[self._tags : self._tags + self._entries].tobytes().count(0) != (
            self._entries - len(spans)
        ):
            raise SegmentCorruptedError(f"{name}: a block tag is not on a free list")
        return spans, free

    def _check(self, now: float) -> None:  # noqa: PLR0912 - one check per invariant
        q = self._q
        gen = q[_GEN]
        name = self._seg.name
        spans, free = self._check_free_blocks()  # + every ring: block -> pairs
        for s in range(self._nslots):
            w = self._slots_w + s * self._slot_words
            if not q[w]:
                continue
            block, cap, np_ = q[w + _RING] - 1, q[w + _RCAP], q[w + _NP]
            if block >= 0:  # rings of older generations are held until freed
                if block in spans or block + cap > self._entries or cap & (cap - 1) or block % cap:
                    raise SegmentCorruptedError(f"{name}: slot {s} has a bad ring")
                spans[block] = cap
            if q[w + _SGEN] != gen:
                continue
            if not 0 <= q[w + _KLEN] <= self._key_bytes or q[w + _COUNT] < 0:
                raise SegmentCorruptedError(f"{name}: slot {s} has a bad length or count")
            if now < self._death(w) < self._d[_SHINT]:
                raise SegmentCorruptedError(f"{name}: slot {s} dies before the hint")
            if block < 0:
                if np_:
                    raise SegmentCorruptedError(f"{name}: slot {s} holds pairs but no ring")
                continue
            if not 0 <= np_ <= cap:
                raise SegmentCorruptedError(f"{name}: slot {s} has a bad ring")
            if np_ and self._d[w + _REXP] < self._d[_RHINT]:
                raise SegmentCorruptedError(f"{name}: slot {s}'s ring expires before the hint")
            if q[w + _TOTAL] < q[w + _BASE]:
                raise SegmentCorruptedError(f"{name}: slot {s} has fewer units than its base")
            prev = q[w + _BASE]
            for i in range(np_):
                cum = q[self._pair(block, (q[w + _HEAD] - np_ + 1 + i) % cap) + 1]
                if cum <= prev:
                    raise SegmentCorruptedError(f"{name}: slot {s}'s ring is out of order")
                prev = cum
            if np_ and prev != q[w + _TOTAL]:
                raise SegmentCorruptedError(f"{name}: slot {s}'s total is not its newest pair's")
        at = 0  # free blocks and rings tile the arena: no overlap, nothing lost
        for block, n in sorted(spans.items()):
            if block != at:
                what = "lost" if block > at else "shared"
                raise SegmentCorruptedError(f"{name}: arena pairs {min(at, block)}.. are {what}")
            at = block + n
        if at != self._entries or q[_INUSE] != self._entries - free:
            raise SegmentCorruptedError(f"{name}: the arena's pairs do not add up")

    @property
    def capacity(self) -> tuple[int, int, int]:
        """``(keys, key_bytes, entries)``, fixed at creation."""
        return self._keys, self._key_bytes, self._entries

    def statistics(self) -> RateLimitStatistics:
        """A snapshot for monitoring (reads without locking: may be slightly stale)."""
        q = self._q
        return RateLimitStatistics(
            name=self._seg.name,
            keys=self._keys,
            live_keys=self._live(time.time()),
            slots_ever_used=q[_USED],
            key_bytes=self._key_bytes,
            entries=self._entries,
            entries_reserved=q[_INUSE],
            longest_probe=q[_MAXPROBE],
            full_errors=q[_FULLS],
            recoveries=self._mutex.recoveries,
            creator_pid=self._seg.header.creator_pid,
        )

    def _repr_fields(self) -> str:
        return f"keys={self._keys}, live_keys={self._live(time.time())}"


def _reattach(name: str, lock_timeout: float | None) -> RateLimitTable:
    table = RateLimitTable.attach(name)
    table.lock_timeout = lock_timeout
    return table


_ZERO_FIELDS: Final = memoryview(bytes(8 * (_SLOT_FIXED - 1))).cast("q")
_ZERO_RING: Final = memoryview(bytes(8 * (_REXP - _RING + 1))).cast("q")
_ZERO_FROM_COUNT: Final = memoryview(bytes(8 * (_REXP - _COUNT + 1))).cast("q")

"""SafeFileStore[V]: a durable, crash-safe, process-safe key-value store in a directory.

The design is an append-only log with a checksum per record (the Bitcask design), and
an in-memory index in every handle:

* ``CURRENT`` names the live log generation; ``data.<generation>.log`` is the log. Each
  log starts with a ``HEADER`` record (format, serializer) and then holds ``SET``,
  ``DEL`` and ``TXN`` records; a log that has been compacted away ends with a ``MOVED``
  record naming its successor.
* A record is a 20-byte header (magic, type, key length, value length, CRC-32 of the
  body, CRC-32 of the header) and a body. A write is one ``write()`` of one record, so a
  transaction, which is one ``TXN`` record, is all-or-nothing.
* Writers serialise on ``fcntl.flock`` of ``write.lock`` (released by the kernel when a
  writer dies, so a SIGKILL never leaves it held) and, inside a process, on a
  per-store ``threading.Lock``. Before appending, a writer reads what others appended
  and truncates a torn tail (a record that a killed writer left half-written: it can
  only be the last one). With ``durable=True`` it calls ``fdatasync`` before it returns
  -- after releasing the lock when other writers are about (group commit: the next
  writer's write, and its sync, overlap ours) -- so an acknowledged write survives power
  loss; readers read only up to what a finished sync covered, so nobody reads a value
  that could still vanish.
* Readers take no file lock: a word in the mapped ``write.lock`` tells them how far the
  log is acknowledged, and they parse only the new records. A record that does not
  check out stops them there; only with the writers excluded (``LOCK_SH``) do they
  decide between a torn tail (ignored: the next writer discards it) and corruption
  (``StoreCorruptedError``).
* Compaction writes the live records to a new generation (temp file, fsync, rename,
  fsync of the directory), appends ``MOVED`` to the old log, then replaces
  ``CURRENT``. Every step leaves a state from which any process reaches the same data:
  the chain of ``MOVED`` records decides, ``CURRENT`` is a shortcut for opening.

See ``docs/design.md`` ("SafeFileStore") for the reasoning behind each choice.


Where things live (see ``docs/design.md``, "Where the store's code lives"):

* ``_format``: records and their CRC-32s, ``CURRENT``, the published-position words, the
  checks of a record and of a torn tail.
* ``_serializers``: the ``Serializer`` protocol and the built-in serializers.
* ``_files``: opening the directory and its files safely; atomic replacement.
* ``_writer``: the writer protocol -- per-process lock, ``flock``, the mapped hint words,
  group commit's counters.
* ``_log``: a handle's view of the log -- index, catch-up, classification of what does not
  check out, appending, compaction -- and the small interface ``Transaction`` and
  ``dump_store`` use.
* ``_api``: ``SafeFileStore``'s mapping API, ``modify``, ``transaction``, ``Transaction``.
* ``_check``: ``check``/``dump`` and recovery.
"""

from __future__ import annotations

from ._api import SafeFileStore, StoreStatistics, Transaction, _reopen
from ._check import (
    DamagedRecord,
    RecoveryReport,
    StoreReport,
    check_store,
    dump_store,
    recover_store,
    scan_store,
)
from ._format import (
    DEL,
    HEADER,
    HEADER_BYTES,
    MOVED,
    SET,
    TXN,
    _crc32,
    _pack,
    _record_length,
    encode_record,
    log_name,
)
from ._serializers import BytesSerializer, JSONSerializer, PickleSerializer, Serializer
from ._writer import _CONTENDED_WRITES

# Pickles of a store name this function: keep the name they use stable (it was defined
# here before the store became a package).
_reopen.__module__ = __name__

__all__ = [
    "DEL",
    "HEADER",
    "HEADER_BYTES",
    "MOVED",
    "SET",
    "TXN",
    "_CONTENDED_WRITES",
    "BytesSerializer",
    "DamagedRecord",
    "JSONSerializer",
    "PickleSerializer",
    "RecoveryReport",
    "SafeFileStore",
    "Serializer",
    "StoreReport",
    "StoreStatistics",
    "Transaction",
    "_crc32",
    "_pack",
    "_record_length",
    "_reopen",
    "check_store",
    "dump_store",
    "encode_record",
    "log_name",
    "recover_store",
    "scan_store",
]

"""How values become bytes: the ``Serializer`` protocol and the built-in ones."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import (
    Any,
    Final,
    Literal,
    Protocol,
)

from ._format import (
    V,
)


# --- serializers ----------------------------------------------------------------------------
class Serializer(Protocol[V]):
    """How a :class:`SafeFileStore` turns values into bytes and back.

    ``name`` is recorded in the store, so opening a store with another serializer than the
    one that wrote it fails with :class:`IncompatibleStoreError` instead of misreading data.
    ``dumps`` must raise (``TypeError``/``ValueError``) for a value it cannot encode; the
    store then changes nothing.
    """

    @property
    def name(self) -> str: ...

    def dumps(self, value: V, /) -> bytes: ...

    def loads(self, data: bytes, /) -> V: ...


class JSONSerializer:
    """JSON (UTF-8, compact). The default: safe to read back from any source.

    JSON's own rules apply: tuples come back as lists, non-string dict keys as strings;
    ``NaN`` and infinities are refused (they are not JSON).
    """

    name = "json"

    def dumps(self, value: Any, /) -> bytes:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()

    def loads(self, data: bytes, /) -> Any:
        return json.loads(data)


class BytesSerializer:
    """Raw bytes: values are stored as given (``bytes``, ``bytearray`` or ``memoryview``)
    and read back as ``bytes``."""

    name = "bytes"

    def dumps(self, value: object, /) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise TypeError(f"a bytes store takes bytes-like values, not {type(value).__name__}")

    def loads(self, data: bytes, /) -> bytes:
        return data


class PickleSerializer:
    """pickle: any picklable value. Opt-in only: unpickling runs code named by the data, so
    use it only for a store that no one else can write (safeshm refuses directories that
    other users can write into, but a pickle store is as trustworthy as its owner)."""

    name = "pickle"

    def dumps(self, value: Any, /) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes, /) -> Any:
        return pickle.loads(data)  # noqa: S301 - opt-in, documented above


_BUILTIN_SERIALIZERS: Final[dict[str, Callable[[], Serializer[Any]]]] = {
    "json": JSONSerializer,
    "bytes": BytesSerializer,
    "pickle": PickleSerializer,
}


SerializerName = Literal["json", "bytes", "pickle"]


def _resolve_serializer(serializer: object) -> Serializer[Any]:
    if isinstance(serializer, str):
        factory = _BUILTIN_SERIALIZERS.get(serializer)
        if factory is None:
            raise ValueError(
                f"unknown serializer {serializer!r}: expected 'json', 'bytes', "
                f"'pickle' or an object with name, dumps and loads"
            )
        return factory()
    name = getattr(serializer, "name", None)
    if (
        not isinstance(name, str)
        or not name
        or not callable(getattr(serializer, "dumps", None))
        or not callable(getattr(serializer, "loads", None))
    ):
        raise TypeError("a serializer needs a non-empty str 'name' and 'dumps'/'loads' methods")
    return serializer  # type: ignore[return-value]  # checked structurally just above


class _RawSerializer:
    """Reads a store of any serializer as raw bytes: what the CLI's check and dump use.
    It takes the name the store records (see ``SafeFileStore._check_header``)."""

    name = "*"

    def dumps(self, value: bytes, /) -> bytes:
        return value

    def loads(self, data: bytes, /) -> bytes:
        return data

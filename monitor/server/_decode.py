"""Request bytes -> protobuf messages, without letting a malformed body become UNKNOWN.

gRPC calls a method's deserializer before the servicer sees the request; when protobuf raises
(truncated bytes, a bad wire type, invalid UTF-8 in a ``string`` field) the call ends UNKNOWN
with a traceback in the log and never reaches the servicer's metrics. Our deserializers never
raise: they return an ``Undecodable`` that names the field, and the servicer turns it into
INVALID_ARGUMENT like every other bad input (one bad Ingest item rejects that item only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from monitor.errors import InvalidInput
from monitor.server._budget import Budget, check

__all__ = ["Undecodable", "decode", "parser", "require_message"]

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """A request body protobuf could not parse, with the field it failed on (when found)."""

    message_type: str
    field: str
    problem: str

    def error(self) -> InvalidInput:
        where = self.field or self.message_type
        return InvalidInput(where, f"a valid {self.message_type} protobuf message", self.problem, reason="malformed")


def parser(cls: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A gRPC ``request_deserializer`` for ``cls`` that never raises."""

    def parse(data: bytes) -> M | Undecodable:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
            field, problem = locate(cls.DESCRIPTOR, data)
            return Undecodable(cls.DESCRIPTOR.full_name, field, problem or f"undecodable bytes ({exc})")

    return parse


def decode(cls: type[M], data: bytes, budget: Budget) -> M:
    """Bytes -> ``cls``: ``InvalidInput`` when the body declares more than ``budget`` allows (checked
    before protobuf allocates anything) or cannot be parsed (naming the field it broke at).

    The server calls this on its scoring threads, never on the event loop.
    """
    check(cls.DESCRIPTOR, data, budget)
    return require_message(parser(cls)(data))


def require_message(request: M | Undecodable) -> M:
    """The parsed message, or ``InvalidInput`` naming the field the bytes broke at."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


# -- locating the broken field ------------------------------------------------------------------
class _WireError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


def locate(descriptor: Any, data: bytes) -> tuple[str, str]:
    """Walk the wire format of ``data`` as ``descriptor`` and return (field path, problem).

    Returns ("", "") when the walk finds nothing wrong (protobuf was stricter than this walk).
    """
    try:
        _walk(descriptor, memoryview(data), "")
    except _WireError as exc:
        return exc.field, exc.problem
    except Exception:  # the walk is a diagnosis; it must never turn a rejection into a crash
        return "", ""
    return "", ""


def _varint(buf: memoryview, pos: int, field: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError(field, "truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError(field, "varint longer than 10 bytes")


def _walk(descriptor: Descriptor, buf: memoryview, prefix: str) -> None:
    pos = 0
    counts: dict[int, int] = {}
    while pos < len(buf):
        key, pos = _varint(buf, pos, prefix or descriptor.name)
        number, wire_type = key >> 3, key & 7
        fd = descriptor.fields_by_number.get(number)
        name = _path(prefix, fd, counts) if fd is not None else _join(prefix, f"<unknown field {number}>")
        if number == 0:
            raise _WireError(prefix or descriptor.name, "field number 0 (not a valid tag)")
        if wire_type == 0:
            _, pos = _varint(buf, pos, name)
        elif wire_type == 1 or wire_type == 5:
            pos += 8 if wire_type == 1 else 4
            if pos > len(buf):
                raise _WireError(name, "truncated fixed-width value")
        elif wire_type == 2:
            length, pos = _varint(buf, pos, name)
            end = pos + length
            if end > len(buf):
                raise _WireError(name, f"length {length} runs past the end of the message")
            if fd is not None:
                _check_delimited(fd, buf[pos:end], name)
            pos = end
        else:
            raise _WireError(name, f"wire type {wire_type} (groups and unknown wire types are not accepted)")
        if fd is not None:
            _check_wire_type(fd, wire_type, name)


def _check_delimited(fd: FieldDescriptor, payload: memoryview, name: str) -> None:
    if fd.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _WireError(name, f"invalid UTF-8 at byte {exc.start}") from None
    elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
        _walk(fd.message_type, payload, name)


_EXPECTED_WIRE: dict[int, set[int]] = {
    FieldDescriptor.TYPE_STRING: {2},
    FieldDescriptor.TYPE_BYTES: {2},
    FieldDescriptor.TYPE_MESSAGE: {2},
    FieldDescriptor.TYPE_DOUBLE: {1, 2},
    FieldDescriptor.TYPE_FIXED64: {1, 2},
    FieldDescriptor.TYPE_SFIXED64: {1, 2},
    FieldDescriptor.TYPE_FLOAT: {5, 2},
    FieldDescriptor.TYPE_FIXED32: {5, 2},
    FieldDescriptor.TYPE_SFIXED32: {5, 2},
}


def _check_wire_type(fd: FieldDescriptor, wire_type: int, name: str) -> None:
    allowed = _EXPECTED_WIRE.get(fd.type, {0, 2})  # varint kinds (packed when repeated)
    if wire_type not in allowed:
        raise _WireError(name, f"wire type {wire_type}, which does not fit a field of this type")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _path(prefix: str, fd: FieldDescriptor, counts: dict[int, int]) -> str:
    if fd.is_repeated and not _is_map(fd):
        index = counts.get(fd.number, 0)
        counts[fd.number] = index + 1
        return _join(prefix, f"{fd.name}[{index}]")
    return _join(prefix, fd.name)


def _is_map(fd: FieldDescriptor) -> bool:
    options: Any = fd.message_type.GetOptions() if fd.message_type is not None else None
    return bool(options is not None and options.map_entry)

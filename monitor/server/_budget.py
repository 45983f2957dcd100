"""The work a request body declares, bounded before protobuf builds a single object from it.

A body can be small on the wire and huge once parsed: 4 M empty ``ActivationBlock`` s fit in
19 MiB and become 4 M Python objects (16 s and 1.2 GB on the event loop); a packed ``shape`` of
57 MiB becomes 57 M integers (3.8 GB). ``check`` walks the wire format and counts what the
message declares (blocks, labels, shape entries, fields), stopping at the first count over its
bound, so the walk itself costs at most a few hundred tag reads, never one per declared item.
Anything it cannot read is left to the parser, whose error names the broken field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from monitor.errors import InvalidInput

__all__ = ["Budget", "check"]


@dataclass(frozen=True)
class Budget:
    """Most items one message may declare.

    ``max_blocks`` bounds each repeated ``ActivationBlock`` field (``activations``, ``decision``):
    a request holds at most one block per hook point. ``max_fields`` bounds the tags of any one
    message, known or not, which bounds this walk too.
    """

    max_blocks: int = 64
    max_labels: int = 8
    max_shape_entries: int = 8
    max_fields: int = 4096


class _Stop(Exception):
    """The wire format is broken here: the parser will say where."""


def check(descriptor: Any, data: bytes, budget: Budget) -> None:
    """Raise ``InvalidInput`` naming the field whose declared count exceeds ``budget``."""
    try:
        _walk(descriptor, memoryview(data), "", budget)
    except _Stop:
        return


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(buf) and shift < 70:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _Stop


def _limit(fd: FieldDescriptor, budget: Budget) -> tuple[int, str, str, str] | None:
    """(bound, what is expected, unit, reason) for a repeated field this walk counts, else None."""
    if fd.message_type is not None and fd.message_type.name == "ActivationBlock":
        expected = f"at most {budget.max_blocks} blocks (one per hook point)"
        return budget.max_blocks, expected, "blocks", "too_many_blocks"
    if fd.name == "labels":
        return budget.max_labels, f"at most {budget.max_labels} entries", "entries", "labels"
    if fd.name == "shape":
        return budget.max_shape_entries, "rank 2 [tokens, d_model]", "dimensions", "rank"
    return None


def _walk(descriptor: Any, buf: memoryview, prefix: str, budget: Budget) -> None:
    pos = 0
    tags = 0
    counts: dict[int, int] = {}
    while pos < len(buf):
        tags += 1
        if tags > budget.max_fields:
            where = prefix or descriptor.name
            raise InvalidInput(
                where,
                f"at most {budget.max_fields} fields in one message",
                f"more than {budget.max_fields}",
                reason="too_many_fields",
            )
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        fd = descriptor.fields_by_number.get(number)
        payload: memoryview | None = None
        if wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Stop
            payload = buf[pos : pos + length]
            pos += length
        else:
            raise _Stop
        if fd is None:
            continue
        limit = _limit(fd, budget)
        if limit is not None:
            # A packed run of varints holds one entry per byte without the continuation bit.
            n = 1 if payload is None or fd.type == FieldDescriptor.TYPE_MESSAGE else _packed_count(payload, limit[0])
            index = counts.get(number, 0)
            counts[number] = index + n
            if counts[number] > limit[0]:
                bound, expected, unit, reason = limit
                raise InvalidInput(_join(prefix, fd.name), expected, f"more than {bound} {unit}", reason=reason)
        sub = fd.message_type
        if payload is not None and sub is not None and sub.name in ("ActivationBlock", "Tensor"):
            index = counts.get(number, 1) - 1
            name = f"{fd.name}[{index}]" if fd.is_repeated else fd.name
            _walk(sub, payload, _join(prefix, name), budget)


def _packed_count(payload: memoryview, bound: int) -> int:
    """Entries in a packed varint run, counted only up to ``bound + 1`` (a run can be 57 MiB)."""
    if len(payload) > 10 * (bound + 1):
        return bound + 1
    return sum(1 for b in payload if not b & 0x80)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

"""One JSON record per line, whatever splits the lines.

``json.dumps(..., ensure_ascii=False)`` escapes the ASCII control characters but writes U+0085
(NEL), U+2028 and U+2029 raw; a JSONL reader that splits on Unicode line breaks (Python's
``str.splitlines``, JavaScript, many log shippers) then cuts a record in two. They are written as
``\\u`` escapes: still valid JSON, the same string once parsed.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["jsonl_line"]

_UNICODE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(record: Any, **dumps: Any) -> str:
    """``record`` as one JSONL line (ending in ``\\n``); ``dumps`` go to ``json.dumps``.

    >>> line = jsonl_line({"request_id": "a\\u2028b"})
    >>> line, len(line.splitlines())
    ('{"request_id": "a\\\\u2028b"}\\n', 1)
    """
    return json.dumps(record, ensure_ascii=False, **dumps).translate(_UNICODE_BREAKS) + "\n"

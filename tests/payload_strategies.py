"""Hypothesis strategies for payloads of every kind a publisher could send, inside the payload
rule and outside it (surrogates, NaN, huge numbers, nesting, extension types, bytes, `$base64`
maps), and how a JSON client would write them."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack
from hypothesis import strategies as st

from mqbroker.protocol.codec import MAX_DEPTH

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(2**63) - 2, max_value=2**64 + 2)
           | st.integers() | st.floats() | st.floats(width=32)
           | st.text() | st.text(alphabet=st.characters(min_codepoint=0xD7F0,
                                                        max_codepoint=0xE010))
           | st.binary(max_size=8)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
           | st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999))
           | st.sampled_from(["!!!!", "AAEC/w==", "AB==", "AAEC\n/w=="]).map(
               lambda s: {"$base64": s}))
keys = st.text(max_size=4) | st.binary(max_size=2) | st.sampled_from(["$base64", "\ud800"])
trees = st.recursive(scalars, lambda children: st.lists(children, max_size=3)
                     | st.dictionaries(keys, children, max_size=3), max_leaves=10)
deep = st.tuples(st.integers(MAX_DEPTH - 2, MAX_DEPTH + 2), scalars).map(
    lambda pair: _wrap(pair[1], pair[0]))
payload_values = trees | deep


def _wrap(value: Any, depth: int) -> Any:
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


def json_text(value: Any) -> str:
    """The value as a JSON client would write it: bytes as {"$base64": ...}, lone surrogates
    as \\u escapes, non-finite floats as overflowing numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("1e999" if value > 0 else "-1e999")
    if isinstance(value, bytes):
        return json.dumps({"$base64": base64.b64encode(value).decode()})
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + json_text(v) for k, v in value.items()
                              if isinstance(k, str)) + "}"
    if isinstance(value, msgpack.ExtType | msgpack.Timestamp):
        return "null"
    return json.dumps(value)  # ensure_ascii: lone surrogates become \ud800 escapes


def parses(frame: str) -> bool:
    """Whether a JSON frame parses at all (`NaN` is not a JSON token)."""
    def refuse(token: str) -> Any:
        raise ValueError(token)
    try:
        json.loads(frame, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True

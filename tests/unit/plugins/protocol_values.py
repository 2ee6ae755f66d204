"""Values the protocol tests send: any JSON (hypothesis), one framed line, and nesting past any schema's depth."""

from __future__ import annotations

import json

from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def line(obj) -> bytes:
    """``obj`` as one protocol line: JSON and a newline."""
    return json.dumps(obj).encode() + b"\n"


def nested(depth):
    """A value ``depth`` lists deep."""
    value = 0
    for _level in range(depth):
        value = [value]
    return value

"""schemathesis hooks for the fuzzing of the API (tests/serve/test_serve.py): every string of a request
body may also be drawn empty, blank, one over the per-field cap or 40,000 characters long, and a live
query's pairs may also come in the shape the model reads (a CLAMS row) with such strings in its
fields, so hostile text reaches the model deployment's checks, not only the format detection."""

import os
from pathlib import Path

import schemathesis
from hypothesis import strategies as st

HOSTILE = ["", " ", "x" * 2001, "The man near the queens " * 1700]


def _hostile(value):
    if isinstance(value, str):
        return st.sampled_from([value, *HOSTILE])
    if isinstance(value, list):
        return st.tuples(*map(_hostile, value)).map(list) if value else st.just(value)
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: _hostile(v) for k, v in value.items()})
    return st.just(value)


TEXT = st.sampled_from(["The man near the queens", " waits", " wait", *HOSTILE])
PAIR = st.fixed_dictionaries({"clean_prefix": TEXT, "clean_answer": TEXT, "patch_answer": TEXT})


@schemathesis.hook
def flatmap_body(ctx, body):
    if os.environ.get("CROSSRAY_FUZZ_MARK"):  # the test checks that these hooks were used
        Path(os.environ["CROSSRAY_FUZZ_MARK"]).touch()
    mixed = _hostile(body)
    if isinstance(body, dict) and "pairs" in body:
        shaped = st.lists(PAIR, min_size=1, max_size=3).map(lambda pairs: {**body, "pairs": pairs})
        return st.one_of(mixed, shaped.flatmap(_hostile))
    return mixed

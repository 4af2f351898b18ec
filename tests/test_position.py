"""The stream's data position in its compact forms: done items as ranges, partly trained items as
bit masks (what a Train checkpoint stores and a restored stream reads back)."""

import numpy as np

from crossray.position import from_ranges, pack_bits, to_ranges, unpack_bits


def test_done_items_round_trip_through_ranges():
    items = {7, 0, 1, 2, 5, 6, 9}
    assert to_ranges(items) == [[0, 3], [5, 8], [9, 10]]  # sorted, contiguous runs joined
    assert from_ranges(to_ranges(items)) == items
    assert to_ranges([]) == [] and from_ranges([]) == set()


def test_partly_trained_rows_round_trip_through_bits():
    mask = np.array([True, False, False, True, True, False, True, False, True, True, False])
    assert unpack_bits(pack_bits(mask), len(mask)).tolist() == mask.tolist()

import numpy as np
import pytest

from secateurs.ir.atoms import AtomTable, RefinementConflict


def test_unify_merges_classes_and_refuses_size_mismatch():
    t = AtomTable()
    a, b, c = t.new(4), t.new(4), t.new(5)
    t.unify(a, b)
    assert t.find(a) == t.find(b)
    with pytest.raises(RefinementConflict):
        t.unify(a, c)


def test_product_refinement_maps_heads_to_consecutive_rows():
    t = AtomTable()
    flat = t.new(12)
    heads, dim = t.split(flat, "prod", (3, 4))
    assert t.leaves(flat) == [t.find(heads), t.find(dim)]
    # channel (head) of each flat row: rows 0-3 -> head 0, rows 4-7 -> head 1, ...
    np.testing.assert_array_equal(t.coords(flat, t.find(heads)), np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(t.coords(flat, t.find(dim)), np.tile(np.arange(4), 3))
    keep = {t.find(heads): np.array([True, False, True])}
    np.testing.assert_array_equal(t.keep_mask(flat, keep), np.repeat([True, False, True], 4))
    assert t.sized(flat, {t.find(heads): 2}) == 8


def test_sum_refinement_and_common_refinement_of_products():
    t = AtomTable()
    x = t.new(24)
    t.split(x, "prod", (2, 12))
    y = t.new(24)
    t.split(y, "prod", (4, 6))
    t.unify(x, y)  # common refinement: 2 x 2 x 6
    sizes = [t.size(leaf) for leaf in t.leaves(x)]
    assert sizes == [2, 2, 6]
    cat = t.concat([t.new(3), t.new(5)])
    leaves = t.leaves(cat)
    np.testing.assert_array_equal(t.coords(cat, leaves[1]), np.array([-1, -1, -1, 0, 1, 2, 3, 4]))


def test_equal_sum_meets_product_couples_the_segments():
    t = AtomTable()
    a, b = t.new(4), t.new(4)
    cat = t.concat([a, b])
    g = t.new(8)
    t.split(g, "prod", (2, 4))
    t.unify(cat, g)
    assert t.find(a) == t.find(b)
    frozen = t.frozen_leaves()
    assert any(t.size(leaf) == 2 for leaf in frozen)  # the segment index is frozen


def test_unequal_sum_against_product_conflicts():
    t = AtomTable()
    cat = t.concat([t.new(2), t.new(6)])
    g = t.new(8)
    t.split(g, "prod", (2, 4))
    with pytest.raises(RefinementConflict):
        t.unify(cat, g)


def test_indivisible_products_conflict():
    t = AtomTable()
    x, y = t.new(24), t.new(24)
    t.split(x, "prod", (6, 4))
    t.split(y, "prod", (4, 6))
    with pytest.raises(RefinementConflict):
        t.unify(x, y)


def test_freeze_propagates_to_leaves_refined_later():
    t = AtomTable()
    x = t.new(8)
    t.freeze(x, "boundary")
    parts = t.split(x, "prod", (2, 4))
    frozen = t.frozen_leaves()
    assert all(t.find(p) in frozen for p in parts)
    assert frozen[t.find(parts[0])] == ("boundary", True)

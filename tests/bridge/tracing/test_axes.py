"""Tests for pzbridge/bridge/tracing/axes.py: the union-find of axis classes, against a set-based model.

The model keeps explicit groups of class indices and the list of recorded
values: two groups may merge unless a recorded value holds a member of each
(those were distinct axes of one value) or both carry different fixed names.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.bridge.tracing.axes import AxisTable

NAMES = ("seq", "kv_seq", "heads", "axis", "seq_2")

# The table is plain Python (microseconds per example): many more examples than the profile's 20 are cheap.
MANY = settings(max_examples=150)

SPECS = st.lists(st.tuples(st.sampled_from(NAMES), st.booleans()), min_size=2, max_size=7)


def _ops(count):
    index = st.integers(0, count - 1)
    unify = st.tuples(st.just("unify"), index, index)
    record = st.tuples(st.just("record"), st.lists(index, min_size=1, max_size=3))
    return st.lists(st.one_of(unify, unify, record), max_size=14)


@st.composite
def scenarios(draw):
    specs = draw(SPECS)
    return specs, draw(_ops(len(specs)))


def _table(specs):
    table = AxisTable()
    return table, [table.new(name, fixed) for name, fixed in specs]


class Model:
    """Groups of class indices with the merge rule stated without union-find."""

    def __init__(self, specs):
        self.specs = specs
        self.group = {i: frozenset([i]) for i in range(len(specs))}
        self.values: list[list[int]] = []

    def fixed_names(self, group):
        return {self.specs[i][0] for i in group if self.specs[i][1]}

    def unify(self, i, j):
        a, b = self.group[i], self.group[j]
        if a == b:
            return True
        if any(set(v) & a and set(v) & b for v in self.values):
            return False
        if len(self.fixed_names(a) | self.fixed_names(b)) > 1:
            return False
        merged = a | b
        for k in merged:
            self.group[k] = merged
        return True

    def expected_root(self, i):
        """(name, fixed) the merged class must show: a fixed name wins, else the earliest member's name."""
        group = self.group[i]
        fixed = self.fixed_names(group)
        if fixed:
            return next(iter(fixed)), True
        return self.specs[min(group)][0], False


def _apply(table, classes, model, ops):
    results = []
    for op in ops:
        if op[0] == "unify":
            got = table.unify(classes[op[1]], classes[op[2]])
            results.append(got)
            if model is not None:
                assert got == model.unify(op[1], op[2]), op
        else:
            table.record_value([classes[i] for i in op[1]])
            if model is not None:
                model.values.append(list(op[1]))
    return results


def _partition(table, classes):
    n = len(classes)
    return {frozenset(j for j in range(n) if table.same(classes[i], classes[j])) for i in range(n)}


@MANY
@given(scenarios())
def test_unify_agrees_with_the_set_model(scenario):
    specs, ops = scenario
    table, classes = _table(specs)
    model = Model(specs)
    _apply(table, classes, model, ops)
    assert _partition(table, classes) == set(model.group.values())
    for i, cls in enumerate(classes):
        root = table.find(cls)
        assert (root.name, root.fixed) == model.expected_root(i)


@MANY
@given(scenarios(), st.data())
def test_unify_is_symmetric(scenario, data):
    specs, ops = scenario
    i, j = data.draw(st.integers(0, len(specs) - 1)), data.draw(st.integers(0, len(specs) - 1))
    (t1, c1), (t2, c2) = _table(specs), _table(specs)
    _apply(t1, c1, None, ops)
    _apply(t2, c2, None, ops)
    assert t1.unify(c1[i], c1[j]) == t2.unify(c2[j], c2[i])
    assert _partition(t1, c1) == _partition(t2, c2)
    assert [(t1.find(c).name, t1.find(c).fixed) for c in c1] == [(t2.find(c).name, t2.find(c).fixed) for c in c2]


@MANY
@given(scenarios(), st.data())
def test_unify_is_idempotent(scenario, data):
    specs, ops = scenario
    i, j = data.draw(st.integers(0, len(specs) - 1)), data.draw(st.integers(0, len(specs) - 1))
    table, classes = _table(specs)
    _apply(table, classes, None, ops)
    assert table.unify(classes[i], classes[i]) is True
    first = table.unify(classes[i], classes[j])
    before = _partition(table, classes)
    assert table.unify(classes[i], classes[j]) == first
    assert table.unify(classes[j], classes[i]) == first
    assert _partition(table, classes) == before
    assert table.same(classes[i], classes[j]) == first


@MANY
@given(st.lists(st.sampled_from(NAMES), min_size=3, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3))
def test_unify_is_transitive_for_compatible_classes(names, fixed):
    table = AxisTable()
    a, b, c = (table.new(n, f) for n, f in zip(names, fixed))
    if table.unify(a, b) and table.unify(b, c):
        assert table.same(a, c)
        assert table.unify(a, c) is True
        assert table.find(a) is table.find(b) is table.find(c)


@MANY
@given(scenarios())
def test_classes_recorded_in_one_value_never_merge(scenario):
    specs, ops = scenario
    table, classes = _table(specs)
    recorded = []
    for op in ops:
        if op[0] == "record":
            dims = [classes[i] for i in op[1]]
            distinct = [(x, y) for x, y in itertools.combinations(dims, 2) if not table.same(x, y)]
            recorded.append(distinct)
            table.record_value(dims)
        else:
            table.unify(classes[op[1]], classes[op[2]])
        # Also try to merge every recorded pair directly after each step.
        for pairs in recorded:
            for x, y in pairs:
                assert table.unify(x, y) is False
                assert not table.same(x, y)


def test_recorded_classes_stay_apart_through_a_third_class():
    table = AxisTable()
    a, b, c = table.new("seq", True), table.new("seq", True), table.new("axis")
    table.record_value([a, b])
    assert table.unify(c, a) is True
    assert table.unify(c, b) is False
    assert table.unify(b, c) is False
    # The merged class is named after the fixed one.
    assert table.find(c).name == "seq" and table.find(c).fixed


def test_recorded_classes_stay_apart_when_the_merge_keeps_the_other_root():
    table = AxisTable()
    c = table.new("seq", True)
    a, b = table.new("axis"), table.new("axis")
    table.record_value([a, b])
    assert table.unify(a, c) is True and table.find(a) is c  # the fixed class is kept, a is dropped
    assert table.unify(c, b) is False and table.unify(b, a) is False


def test_recorded_classes_stay_apart_when_both_sides_were_merged_away():
    table = AxisTable()
    c, e = table.new("seq", True), table.new("heads", True)
    a, b = table.new("axis"), table.new("axis")
    table.record_value([a, b])
    assert table.unify(a, c) and table.unify(b, e)
    assert table.unify(c, e) is False  # also fixed names differ; the pair below differs only by the record
    f, g = table.new("seq", True), table.new("seq", True)
    x, y = table.new("axis"), table.new("axis")
    table.record_value([x, y])
    assert table.unify(x, f) and table.unify(y, g)
    assert table.unify(f, g) is False and table.unify(g, x) is False


def test_fixed_names_win_over_unfixed_in_either_argument_order():
    for flip in (False, True):
        table = AxisTable()
        unfixed, fixed = table.new("axis"), table.new("heads", fixed=True)
        assert table.unify(*((fixed, unfixed) if flip else (unfixed, fixed)))
        root = table.find(unfixed)
        assert (root.name, root.fixed) == ("heads", True)
        assert root is table.find(fixed)


def test_two_fixed_classes_merge_only_with_equal_names():
    table = AxisTable()
    seq, other_seq, heads = table.new("seq", True), table.new("seq", True), table.new("heads", True)
    assert table.unify(seq, heads) is False
    assert table.unify(seq, other_seq) is True
    assert table.unify(other_seq, heads) is False
    # Two unfixed classes: the earlier one's name.
    a, b = table.new("axis_a"), table.new("axis_b")
    assert table.unify(b, a) and table.find(b).name == "axis_a" and not table.find(b).fixed


def test_same_treats_absent_unit_axes():
    table = AxisTable()
    a = table.new("seq")
    assert table.same(None, None)
    assert not table.same(a, None) and not table.same(None, a)
    assert table.same(a, a)


def test_size_like_is_kept():
    table = AxisTable()
    seq = table.new("seq", True)
    kv = table.new("seq", True, size_like=seq)
    assert kv.size_like is seq


# final_names ------------------------------------------------------------------------------

@st.composite
def naming_scenarios(draw):
    specs, ops = draw(scenarios())
    n = len(specs)
    values = draw(st.lists(st.lists(st.one_of(st.none(), st.integers(0, n - 1)), max_size=4), max_size=6))
    return specs, ops, values


@MANY
@given(naming_scenarios())
def test_final_names_never_give_one_value_two_equal_names(scenario):
    specs, ops, values = scenario
    table, classes = _table(specs)
    _apply(table, classes, None, ops)
    dims = [[None if i is None else classes[i] for i in value] for value in values]
    names = table.final_names(dims)
    for value in dims:
        roots = {table.find(d).order: table.find(d) for d in value if d is not None}
        given_names = [table.name_of(r, names) for r in roots.values()]
        assert len(set(given_names)) == len(given_names), (value, given_names)
    for root_order, name in names.items():
        root = next(table.find(c) for c in classes if table.find(c).order == root_order)
        base = root.name
        assert name == base or name == "kv_" + base or (name.startswith(base + "_") and name[len(base) + 1:].isdigit())
    # Deterministic: the same call gives the same names.
    assert table.final_names(dims) == names
    assert table.name_of(None, names) is None


def test_a_clashing_seq_becomes_kv_seq():
    table = AxisTable()
    q, k = table.new("seq", True), table.new("seq", True)
    table.record_value([q, k])
    names = table.final_names([[q, k], [q], [k, None]])
    assert (table.name_of(q, names), table.name_of(k, names)) == ("seq", "kv_seq")


def test_further_clashes_get_numbered_suffixes():
    table = AxisTable()
    seqs = [table.new("seq", True) for _ in range(3)]
    heads = [table.new("heads", True) for _ in range(2)]
    kvs = [table.new("kv_seq", True) for _ in range(2)]
    names = table.final_names([seqs, heads, kvs])
    assert [table.name_of(c, names) for c in seqs] == ["seq", "kv_seq", "seq_2"]
    # The first "heads" keeps its name, the second gets a derived one. (Which one is not pinned: the
    # docstring says "_2" for names other than seq, the code gives "kv_heads", like graph.py's contractions.)
    first_heads, second_heads = (table.name_of(c, names) for c in heads)
    assert first_heads == "heads" and second_heads in ("heads_2", "kv_heads")
    # A kv_ name gets no second prefix.
    assert [table.name_of(c, names) for c in kvs] == ["kv_seq", "kv_seq_2"]


def test_classes_in_different_values_may_share_a_name():
    table = AxisTable()
    a, b, c = table.new("seq", True), table.new("seq", True), table.new("features", True)
    names = table.final_names([[a, c], [b, c]])
    assert table.name_of(a, names) == table.name_of(b, names) == "seq"
    # A class outside every value keeps its own name.
    assert table.name_of(table.new("heads"), names) == "heads"

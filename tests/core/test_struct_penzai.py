"""Penzai 0.2.5 struct features: any-class pytree dataclasses, mutable-proxy __init__, safety checks, helpers."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import StructError
from pzbridge.core.struct import (
    Struct,
    is_pytree_dataclass_type,
    pytree_dataclass,
    static_field,
)


def test_non_struct_class_with_its_own_flatten_is_registered_with_keys():
    @pytree_dataclass
    class Point:
        x: Any
        y: Any

        def tree_flatten_with_keys(self):
            return ((jax.tree_util.DictKey("x"), self.x), (jax.tree_util.DictKey("y"), self.y)), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    p = Point(1, 2)
    assert jax.tree_util.tree_flatten_with_path(p)[0] == [((jax.tree_util.DictKey("x"),), 1),
                                                          ((jax.tree_util.DictKey("y"),), 2)]
    assert jax.tree_util.tree_map(lambda v: v * 10, p) == Point(10, 20)  # dataclass eq for non-Structs
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3
    assert is_pytree_dataclass_type(Point)


def test_custom_init_assigns_fields_through_a_mutable_proxy():
    @pytree_dataclass
    class Dense(Struct):
        w: Any
        name: str = static_field()

        def __init__(self, n: int, name: str = "dense"):
            self.w = jnp.ones(n)
            self.name = name
            self.scratch = "not a field"

    d = Dense(3)
    assert d.w.shape == (3,) and d.name == "dense" and not hasattr(d, "scratch")
    assert type(d) is Dense
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.w = None
    rebuilt = jax.tree_util.tree_map(lambda v: v * 2, d)
    assert rebuilt.w.tolist() == [2.0, 2.0, 2.0] and rebuilt.name == "dense"

    @pytree_dataclass
    class Forgetful(Struct):
        a: int
        b: int

        def __init__(self):
            self.a = 1

    with pytest.raises(StructError, match=r"returned without setting field 'b'"):
        Forgetful()


def test_without_the_proxy_init_must_use_object_setattr():
    @pytree_dataclass(use_mutable_proxy_in_init=False)
    class Raw(Struct):
        a: int

        def __init__(self, a):
            object.__setattr__(self, "a", a + 1)

    assert Raw(1).a == 2

    @pytree_dataclass(use_mutable_proxy_in_init=False)
    class Broken(Struct):
        a: int

        def __init__(self, a):
            self.a = a

    with pytest.raises(dataclasses.FrozenInstanceError):
        Broken(1)


def test_inheriting_a_hand_written_init_needs_an_explicit_choice():
    @pytree_dataclass
    class Base(Struct):
        a: int

        def __init__(self, base):
            self.a = base * 10

    with pytest.raises(StructError, match=r"would replace the __init__ that Child inherits from Base.*overwrite_parent_init=True"):

        @pytree_dataclass
        class Child(Base):
            a: int

    @pytree_dataclass(overwrite_parent_init=True)
    class Generated(Base):
        a: int

    @pytree_dataclass(init=False)
    class Inherited(Base):
        a: int

    assert Generated(1).a == 1 and Inherited(1).a == 10


def test_field_order_check_is_opt_in():
    @pytree_dataclass
    class Parent(Struct):
        a: int

    @pytree_dataclass  # default: inheriting fields is fine (pzbridge's marker subclasses)
    class Marker(Parent):
        pass

    assert Marker(1).a == 1
    with pytest.raises(StructError, match=r"fields are \['a', 'b'\], but the class declares \['b'\]"):

        @pytree_dataclass(has_implicitly_inherited_fields=False)
        class Strict(Parent):
            b: int

    @pytree_dataclass(has_implicitly_inherited_fields=False)
    class Explicit(Parent):
        a: int
        b: int

    assert Explicit(1, 2).b == 2

    @pytree_dataclass(has_implicitly_inherited_fields=True)
    class Implicit(Parent):
        b: int

    assert Implicit(1, 2).attributes_dict() == {"a": 1, "b": 2}
    with pytest.raises(StructError, match="inherits no field"):

        @pytree_dataclass(has_implicitly_inherited_fields=True)
        class Pointless(Struct):
            a: int


def test_decorating_twice_and_is_pytree_dataclass_type():
    @pytree_dataclass
    class Once(Struct):
        a: int

    with pytest.raises(StructError, match="already a pytree dataclass"):
        pytree_dataclass(Once)

    class Sub(Once):
        pass

    assert is_pytree_dataclass_type(Once) and not is_pytree_dataclass_type(Sub)
    assert not is_pytree_dataclass_type(Once(1)) and not is_pytree_dataclass_type(int)
    assert is_pytree_dataclass_type(pzb.nn.Linear) and is_pytree_dataclass_type(pzb.nx.NamedArray)


def test_key_for_field_attributes_dict_and_from_attributes():
    @pytree_dataclass
    class Cell(Struct):
        w: Any
        size: int = static_field(default=2)

        def __post_init__(self):
            if self.size < 0:
                raise ValueError("negative")

    c = Cell(jnp.zeros(2))
    assert Cell.key_for_field("w") == jax.tree_util.GetAttrKey("w")
    assert pzb.select(c).at_keypaths([(Cell.key_for_field("w"),)]).count() == 1
    with pytest.raises(StructError, match=r"no field 'v'"):
        Cell.key_for_field("v")
    assert set(c.attributes_dict()) == {"w", "size"}
    skipped = Cell.from_attributes(w=1, size=-1)  # __post_init__ is not run
    assert skipped.size == -1
    with pytest.raises(StructError, match=r"missing \['size'\], unknown \['z'\]"):
        Cell.from_attributes(w=1, z=2)


@settings(max_examples=20, derandomize=True)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=5), st.text(min_size=1, max_size=3))
def test_from_attributes_inverts_attributes_dict(values, tag):
    @pytree_dataclass
    class Holder(Struct):
        xs: Any
        tag: str = static_field()

        def __init__(self, n):
            self.xs = list(range(n))
            self.tag = "built"

    h = Holder.from_attributes(xs=values, tag=tag)
    assert h.attributes_dict() == {"xs": values, "tag": tag}
    assert Holder.from_attributes(**h.attributes_dict()) == h
    assert jax.tree_util.tree_leaves(h) == values

"""Policy registration is explicit: only @register_policy lists a class, under its own name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from spkv.policies import H2O, POLICIES, register_policy


def test_subclass_without_its_own_name_is_refused_and_parent_kept():
    @dataclass
    class Variant(H2O):  # not registered: a plain subclass is just a class
        pass

    assert POLICIES["h2o"] is H2O
    with pytest.raises(TypeError, match="must set its own `name`"):
        register_policy(Variant)
    assert POLICIES["h2o"] is H2O


def test_taken_name_is_refused():
    @dataclass
    class Clash(H2O):
        name = "tova"

    with pytest.raises(TypeError, match="taken"):
        register_policy(Clash)


def test_registered_policy_is_listed():
    @register_policy
    @dataclass
    class Doubled(H2O):
        name = "test_doubled_h2o"

    try:
        assert POLICIES["test_doubled_h2o"] is Doubled
    finally:
        del POLICIES["test_doubled_h2o"]

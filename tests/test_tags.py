"""One tagging helper: roles are an enum, and tagged() finds exactly the nodes of a pass and role."""
import pytest
from torch import fx

import dsd_fx
from conftest import TinyMLP
from dsd_fx.tags import Role, tag, tagged


def test_a_role_must_be_the_enum():
    gm = fx.symbolic_trace(TinyMLP())
    node = next(iter(gm.graph.nodes))
    with pytest.raises(TypeError, match="Role"):
        tag(node, "some_pass", "mask")


def test_tagged_filters_by_pass_and_role():
    sparse = dsd_fx.transform(TinyMLP())
    masks = list(tagged(sparse.graph, role=Role.MASK_BUFFER))
    assert sorted(n.target for n in masks) == ["fc1.weight_mask", "fc2.weight_mask"]
    assert len(list(tagged(sparse.graph, "insert_masks", Role.MASKED_WEIGHT))) == 2
    assert list(tagged(sparse.graph, "pack_nm")) == []


def test_roles_have_distinct_names():
    values = [r.value for r in Role]
    assert len(set(values)) == len(values)
    assert "mask" not in values and "masked" not in values  # the old one-letter pair

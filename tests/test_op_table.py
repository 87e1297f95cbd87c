"""The op table: one row per op; a row added for a function dsd_fx does not know makes it prunable."""
import copy
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import dsd_fx
from dsd_fx import op_table
from dsd_fx.op_table import OpRow, Packed, Slot


def scaled_linear(x, w, b):
    """x @ w.T + b, through a function that symbolic_trace keeps as one call (fx.wrap)."""
    return F.linear(x, w, b)


fx.wrap("scaled_linear")


class UsesScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.b = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(scaled_linear(x, self.w, self.b)))


@pytest.fixture
def row():
    row = OpRow("scaled_linear", (Slot("w", -1, 0, 1, index=1),), packed=Packed(x=0, weight=1, bias=2), channel_dim=-1)
    op_table.register_function(scaled_linear, row)
    yield row
    del op_table.FUNCTIONS[("call_function", scaled_linear)]


def test_an_unknown_function_is_left_alone():
    sparse = dsd_fx.transform(UsesScaledLinear())
    assert "w" not in dsd_fx.current_masks(sparse) and set(dsd_fx.current_masks(sparse)) == {"head.weight"}


def test_one_row_makes_it_masked_then_redensed(row):
    model = UsesScaledLinear()
    reference = fx.symbolic_trace(UsesScaledLinear())
    x = torch.randn(5, 16)
    sparse = dsd_fx.transform(model, sparsity=0.5)
    assert set(dsd_fx.current_masks(sparse)) == {"w", "head.weight"}
    assert int((model.w == 0).sum()) == 64
    user = next(n for n in sparse.graph.nodes if n.target is scaled_linear)
    assert user.args[1].target is dsd_fx.ops.mask_mul
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code == reference.code
    assert list(dense.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(dense(x), model(x))


def test_one_row_makes_it_packed_where_the_row_allows(row):
    model = UsesScaledLinear()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 16)
    packed = dsd_fx.transform(model, pattern="2:4", pack=True)
    assert not any(n.target is scaled_linear for n in packed.graph.nodes)
    assert sum(n.target is torch.ops.dsd_fx.nm_linear.default for n in packed.graph.nodes) == 2
    keep = dsd_fx.current_masks(packed)
    head = F.linear(torch.relu(F.linear(x, ref.w * keep["w"], ref.b)), ref.head.weight * keep["head.weight"], ref.head.bias)
    expected = head
    torch.testing.assert_close(packed(x), expected)
    dense = dsd_fx.transform(packed, phase="dense")
    assert any(n.target is scaled_linear for n in dense.graph.nodes)
    torch.testing.assert_close(dense(x), expected)


def test_a_row_without_a_packed_form_keeps_dense_compute(row):
    op_table.register_function(scaled_linear, OpRow("scaled_linear", row.slots))
    packed = dsd_fx.transform(UsesScaledLinear(), pattern="2:4", pack=True)
    user = next(n for n in packed.graph.nodes if n.target is scaled_linear)
    assert user.args[1].target is torch.ops.dsd_fx.nm_unpack.default


def test_register_function_needs_a_row():
    with pytest.raises(TypeError, match="OpRow"):
        op_table.register_function(scaled_linear, {"slots": ()})


@pytest.mark.parametrize("cls", [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.LSTM, nn.GRU,
                                 nn.MultiheadAttention, nn.Embedding])
def test_every_layer_class_has_one_row(cls):
    assert cls in op_table.MODULES


def test_a_subclass_that_overrides_forward_has_no_row():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert op_table.module_row(Doubled(2, 2)) is None
    assert op_table.module_row(nn.Linear(2, 2)).kind == "linear"


def test_channel_dims_of_the_weights():
    conv, convt = op_table.MODULES[nn.Conv2d].slots_of()[0], op_table.MODULES[nn.ConvTranspose2d].slots_of()[0]
    # Conv2d weight (out, in/groups, kh, kw); ConvTranspose2d weight (in, out/groups, kh, kw)
    assert (conv.out_dim, conv.in_dim, conv.reduction) == (0, 1, 1)
    assert (convt.out_dim, convt.in_dim, convt.reduction) == (1, 0, 0)
    lstm = op_table.MODULES[nn.LSTM].slots_of(nn.LSTM(4, 3, num_layers=2, bidirectional=True))
    assert [s.name for s in lstm] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse",
                                      "weight_ih_l1", "weight_hh_l1", "weight_ih_l1_reverse", "weight_hh_l1_reverse"]


def test_einsum_reduction_dims():
    assert op_table.einsum_reduction_dims("bi,oi->bo", 2) == [1, 1]
    assert op_table.einsum_reduction_dims("bij,jk", 2) == [2, 0]
    assert op_table.einsum_reduction_dims("bij,ijk->bk", 2) == [None, None]


# ---- the columns that hold what other modules once knew by class or by name


def test_layer_class_comes_from_the_rows():
    assert [op_table.layer_class("conv", d) for d in (1, 2, 3)] == [nn.Conv1d, nn.Conv2d, nn.Conv3d]
    assert [op_table.layer_class("max_pool", d) for d in (1, 2, 3)] == [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d]
    assert op_table.layer_class("conv_transpose", 2) is nn.ConvTranspose2d
    with pytest.raises(KeyError, match="no layer of family 'conv' with 4"):
        op_table.layer_class("conv", 4)


def test_every_weight_layer_that_prune_or_grow_resizes_names_its_sizes():
    for cls, row in op_table.MODULES.items():
        assert (row.resize is None) == (not row.sizes), cls
    for cls in (nn.Linear, nn.Conv2d, nn.ConvTranspose1d, nn.Embedding, nn.BatchNorm2d, nn.InstanceNorm1d):
        assert op_table.MODULES[cls].resize is not None, cls


@pytest.mark.parametrize("cls,size", [(nn.Conv2d, 2), (nn.ConvTranspose2d, 2), (nn.Linear, 0)])
def test_resize_writes_what_the_tensors_hold(cls, size):
    layer = cls(6, 4, 3) if size else cls(6, 4)
    layer.weight = nn.Parameter(layer.weight.detach()[:3] if cls is not nn.ConvTranspose2d else layer.weight.detach()[:5])
    op_table.module_row(layer).resize(layer, 1)
    if cls is nn.Linear:
        assert (layer.out_features, layer.in_features) == (3, 6)
    elif cls is nn.Conv2d:
        assert (layer.out_channels, layer.in_channels) == (3, 6)
    else:
        assert (layer.in_channels, layer.out_channels) == (5, 4)


def test_macs_of_a_row_as_the_cost_counts_them():
    lin, conv = op_table.MODULES[nn.Linear], op_table.MODULES[nn.Conv2d]
    assert lin.macs(nn.Linear(16, 8), (4, 8), (4, 16)) == 4 * 8 * 16
    assert conv.macs(nn.Conv2d(3, 8, 3, groups=1), (1, 8, 5, 5), (1, 3, 7, 7)) == 8 * 25 * 3 * 9
    assert op_table.FUNCTIONS[("call_function", torch.matmul)].macs(None, (4, 8), (4, 16)) == 4 * 8 * 16
    assert op_table.FUNCTIONS[("call_function", F.relu)].macs is None


def test_classifier_rows_and_groups_argument():
    assert op_table.MODULES[nn.Linear].classifier_input == 0
    assert op_table.FUNCTIONS[("call_function", F.linear)].classifier_input == 0
    assert op_table.FUNCTIONS[("call_function", torch.ops.dsd_fx.nm_linear.default)].classifier_input == 0
    assert op_table.MODULES[nn.Conv2d].classifier_input is None
    assert op_table.FUNCTIONS[("call_function", F.conv2d)].groups_arg == 6
    assert op_table.FUNCTIONS[("call_function", F.conv_transpose1d)].groups_arg == 6
    assert op_table.FUNCTIONS[("call_function", F.linear)].groups_arg is None
    assert op_table.MODULES[nn.ConvTranspose2d].dropped_args == ("output_size",)


def test_refusing_rows_are_complete_where_defined():
    for cls in (nn.MultiheadAttention, nn.LSTM, nn.GRUCell):
        rule = op_table.MODULES[cls].channels
        assert rule.flow is op_table.Flow.REFUSE and cls.__name__ in rule.reason
    source = (pathlib.Path(op_table.__file__)).read_text()
    assert "= replace(" not in source  # no row is made and then patched further down


def test_channel_flow_reads_the_rows_not_op_names():
    root = pathlib.Path(op_table.__file__).parent / "channels"
    source = (root / "flow.py").read_text() + (root / "rules.py").read_text()
    for by_name in ('"permute"', '"flatten"', '("size", "dim")', "operator.getitem", "torch.flatten", "torch.permute", "is getattr"):
        assert by_name not in source, by_name
    assert op_table.FUNCTIONS[("call_function", torch.permute)].channels.permutes
    assert not op_table.FUNCTIONS[("call_method", "flatten")].channels.shape_args
    assert op_table.FUNCTIONS[("call_method", "size")].channels.flow is op_table.Flow.QUERY

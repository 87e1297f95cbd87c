"""The op table's channel rows for aten ops: how channels flow through torch.export's graphs."""
from __future__ import annotations

import torch

from dsd_fx.op_table import FUNCTIONS, ChannelRule, Flow, OpRow

aten = torch.ops.aten

_EW, _PASS = ChannelRule(Flow.ELEMENTWISE), ChannelRule(Flow.PASS)
_STATS = "normalises over the channel dim: removing a channel changes every other channel's statistics"

ELEMENTWISE = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.mul.Tensor,
               aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
               aten.pow.Scalar, aten.maximum.default, aten.minimum.default, aten.where.self, aten.masked_fill.Scalar,
               aten.masked_fill.Tensor)
UNARY = (aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
         aten.exp.default, aten.neg.default, aten.abs.default, aten.rsqrt.default, aten.sqrt.default, aten.cos.default,
         aten.sin.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
         aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
         aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.hardswish.default,
         aten.hardsigmoid.default, aten.mish.default, aten.softplus.default, aten.clamp.default, aten.dropout.default,
         aten.feature_dropout.default, aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
         aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
         aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default)
RESHAPE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)  # their arguments spell the shape
SHAPE_FREE = (aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
              aten.unflatten.int)
QUERY = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.new_ones.default,
              aten.new_zeros.default, aten.new_full.default, aten.new_empty.default, aten.zeros_like.default,
              aten.ones_like.default, aten.empty_like.default, aten.full_like.default)

ROWS: dict[object, OpRow] = {
    **{op: OpRow(str(op), (), channels=_EW) for op in ELEMENTWISE},
    **{op: OpRow(str(op), (), channels=_PASS) for op in UNARY},
    **{op: OpRow("reshape", (), channels=ChannelRule(Flow.RESHAPE)) for op in RESHAPE},
    **{op: OpRow("reshape", (), channels=ChannelRule(Flow.RESHAPE, shape_args=False)) for op in SHAPE_FREE},
    **{op: OpRow("size", (), channels=ChannelRule(Flow.QUERY)) for op in QUERY},
    aten.transpose.int: OpRow("move", (), channels=ChannelRule(Flow.MOVE)),
    aten.permute.default: OpRow("move", (), channels=ChannelRule(Flow.MOVE, permutes=True)),
    aten.expand.default: OpRow("expand", (), channels=ChannelRule(Flow.EXPAND)),
    aten.slice.Tensor: OpRow("slice", (), channels=ChannelRule(Flow.SLICE, dim_arg=1)),
    aten.select.int: OpRow("select", (), channels=ChannelRule(Flow.SLICE, dim_arg=1)),
    aten.cat.default: OpRow("cat", (), channels=ChannelRule(Flow.CAT, dim_arg=1)),
    aten.split.Tensor: OpRow("split", (), channels=ChannelRule(Flow.SPLIT, dim_arg=2)),
    aten.split_with_sizes.default: OpRow("split", (), channels=ChannelRule(Flow.SPLIT, dim_arg=2)),
    aten.chunk.default: OpRow("chunk", (), channels=ChannelRule(Flow.SPLIT, dim_arg=2)),
    aten.mean.dim: OpRow("reduce", (), channels=ChannelRule(Flow.REDUCE, dim_arg=1)),
    aten.sum.dim_IntList: OpRow("reduce", (), channels=ChannelRule(Flow.REDUCE, dim_arg=1)),
    aten.amax.default: OpRow("reduce", (), channels=ChannelRule(Flow.REDUCE, dim_arg=1)),
    aten.var.correction: OpRow("reduce", (), channels=ChannelRule(Flow.REDUCE, dim_arg=1)),
    aten.softmax.int: OpRow("softmax", (), channels=ChannelRule(Flow.SOFTMAX, dim_arg=1)),
    aten._softmax.default: OpRow("softmax", (), channels=ChannelRule(Flow.SOFTMAX, dim_arg=1)),
    aten.log_softmax.int: OpRow("softmax", (), channels=ChannelRule(Flow.SOFTMAX, dim_arg=1)),
    aten.scaled_dot_product_attention.default: OpRow("scaled_dot_product_attention", (), channels=ChannelRule(Flow.ATTENTION)),
    aten.repeat_interleave.self_int: OpRow("repeat_interleave", (), channels=ChannelRule(Flow.REPEAT_INTERLEAVE, dim_arg=2)),
    aten.layer_norm.default: OpRow("layer_norm", (), channels=ChannelRule(Flow.LAYER_NORM, reason="layer_norm " + _STATS)),
    aten.rms_norm.default: OpRow("rms_norm", (), channels=ChannelRule(Flow.LAYER_NORM, reason="rms_norm " + _STATS)),
    aten.batch_norm.default: OpRow("batch_norm", (), channels=ChannelRule(Flow.NORM)),
    aten.group_norm.default: OpRow("group_norm", (), channels=ChannelRule(
        Flow.REFUSE, reason="group_norm mixes channels (statistics across the channel dim)")),
}


def register_aten_channels() -> None:
    """Add the aten channel rows to the op table (op_table.FUNCTIONS), where no weight row holds the op."""
    for target, row in ROWS.items():
        FUNCTIONS.setdefault(("call_function", target), row)


register_aten_channels()

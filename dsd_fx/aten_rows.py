"""The op table's aten rows: the ops torch.export's training IR (torch 2.13) makes of the layers dsd_fx prunes."""
from __future__ import annotations

import torch

from dsd_fx.op_table import EINSUM, FUNCTIONS, OpRow, Packed, Slot, _mm_slots, _w

aten = torch.ops.aten

# x @ W.T (+ b): the packed kernel's own form
_LINEAR = OpRow("linear", (Slot("weight", -1, 0, 1, index=1),), packed=Packed(0, 1, 2, "bias"), fresh_grad=True, channel_dim=-1)
_MM = Packed(x=0, weight=1)  # x @ W: W is (in, out), the packed kernel takes W.T = (out, in)
# aten.lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
# `params` is the list [weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ...]; every 2-d entry is a
# (gates * hidden, input) matrix contracted along dim 1 (the 1-d biases are no matmul weights)
_RECURRENT_PARAMS = (Slot("params", 1, 0, 1, index=2),)

ATEN_ROWS: dict[object, OpRow] = {
    aten.linear.default: _LINEAR,
    aten.addmm.default: OpRow(
        "addmm", (Slot("mat1", -1, index=1), Slot("mat2", -2, -1, -2, index=2)),
        packed=Packed(x=1, weight=2, bias=0, no_kwargs=True), fresh_grad=True, channel_dim=-1,
    ),
    aten.mm.default: OpRow("mm", _mm_slots("self", "mat2"), packed=_MM, fresh_grad=True, channel_dim=-1),
    aten.matmul.default: OpRow("matmul", _mm_slots("self", "other"), packed=_MM, fresh_grad=True, channel_dim=-1),
    aten.bmm.default: OpRow("bmm", _mm_slots("self", "mat2"), fresh_grad=False, channel_dim=-1),
    # the equation decides the slots: see op_table.einsum_slots
    aten.einsum.default: EINSUM,
    aten.conv1d.default: OpRow("conv1d", _w(1, 0, 1), fresh_grad=True, channel_dim=-2),
    aten.conv1d.padding: OpRow("conv1d", _w(1, 0, 1), fresh_grad=True, channel_dim=-2),
    aten.conv2d.default: OpRow("conv2d", _w(1, 0, 1), fresh_grad=True, channel_dim=-3),
    aten.conv2d.padding: OpRow("conv2d", _w(1, 0, 1), fresh_grad=True, channel_dim=-3),
    aten.conv3d.default: OpRow("conv3d", _w(1, 0, 1), fresh_grad=True, channel_dim=-4),
    aten.conv3d.padding: OpRow("conv3d", _w(1, 0, 1), fresh_grad=True, channel_dim=-4),
    aten.conv_transpose1d.default: OpRow("conv_transpose1d", _w(0, 1, 0), fresh_grad=True, channel_dim=-2),
    aten.conv_transpose2d.input: OpRow("conv_transpose2d", _w(0, 1, 0), fresh_grad=True, channel_dim=-3),
    aten.conv_transpose3d.input: OpRow("conv_transpose3d", _w(0, 1, 0), fresh_grad=True, channel_dim=-4),
    # (num_embeddings, embedding_dim): a lookup reads rows, it is no matmul: opt-in, as nn.Embedding
    aten.embedding.default: OpRow("embedding", (Slot("weight", 1, 1, None, index=0),), fresh_grad=False, channel_dim=-1, opt_in=True),
    aten.lstm.input: OpRow("lstm", _RECURRENT_PARAMS, fresh_grad=False),
    aten.gru.input: OpRow("gru", _RECURRENT_PARAMS, fresh_grad=False),
    aten.rnn_tanh.input: OpRow("rnn", _RECURRENT_PARAMS, fresh_grad=False),
    aten.rnn_relu.input: OpRow("rnn", _RECURRENT_PARAMS, fresh_grad=False),
}


def register_aten_rows() -> None:
    """Add the aten rows to the op table (op_table.FUNCTIONS), keyed as fx keys call_function nodes."""
    for target, row in ATEN_ROWS.items():
        FUNCTIONS[("call_function", target)] = row


register_aten_rows()

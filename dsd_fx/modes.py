"""train()/eval() for exported graphs: the ops whose behaviour depends on the mode read it from the module."""
from __future__ import annotations

import torch
from torch import fx, nn

aten = torch.ops.aten

MODE = "_dsd_fx_mode"  # the submodule the graph reads its mode from

# op -> position of its `train` argument, which torch.export bakes in as the mode at capture
TRAIN_ARG: dict[object, int] = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.batch_norm.default: 5,
    aten.lstm.input: 6,
    aten.gru.input: 6,
    aten.rnn_tanh.input: 6,
    aten.rnn_relu.input: 6,
}
_BATCH_NORM_RUNNING_MEAN = 3
# attention whose dropout probability the model picks by its mode (`dropout_p=p if self.training
# else 0.0`, as transformers does): op -> (position, keyword) of dropout_p
DROPOUT_P: dict[object, tuple[int, str]] = {aten.scaled_dot_product_attention.default: (4, "dropout_p")}


class ModeFlag(nn.Module):
    """Returns its own `training` flag, which `gm.train()` / `gm.eval()` set like any submodule's.

    A graph that reads its mode through this call (rather than a constant) switches dropout,
    batch norm and recurrent dropout with the GraphModule; torch.compile guards on the flag, and a
    re-export (ONNX) sees the mode of the moment as a constant, as it would for the user's model.
    """

    def forward(self) -> bool:
        return self.training


def count_batches(counter: torch.Tensor, training) -> None:
    """BatchNorm's `num_batches_tracked += 1`, in train mode only (what nn.BatchNorm does)."""
    proxy = next((a for a in (counter, training) if isinstance(a, fx.Proxy)), None)
    if proxy is not None:  # fx re-tracing (torch.load): one node
        return proxy.tracer.create_proxy("call_function", count_batches, (counter, training), {})
    if training:
        counter.add_(1)
    return None


def when_training(value: float, training) -> float:
    """`value` in train mode, 0.0 in eval: an attention dropout probability that follows the mode."""
    if isinstance(training, fx.Proxy):  # fx re-tracing (torch.load): one node
        return training.tracer.create_proxy("call_function", when_training, (value, training), {})
    return value if training else 0.0


def _dropout_p(node: fx.Node) -> tuple[object, int | str] | None:
    """(dropout_p, where) of an attention op that takes one, or None."""
    if node.op != "call_function" or node.target not in DROPOUT_P:
        return None
    k, kw = DROPOUT_P[node.target]
    if len(node.args) > k:
        return node.args[k], k
    return (node.kwargs[kw], kw) if kw in node.kwargs else None


def _is_counter_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten.add_.Tensor and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
            and node.args[0].target.rpartition(".")[2] == "num_batches_tracked" and node.args[1] == 1
            and not node.users)


def _sites(graph: fx.Graph, mode: bool) -> list[fx.Node]:
    """The mode-dependent ops whose `train` argument is the capture's mode (a flag that differs,
    such as an explicit F.dropout(training=False) in a model captured in train mode, is the model's own)."""
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in TRAIN_ARG:
            continue
        k = TRAIN_ARG[node.target]
        if len(node.args) <= k or node.args[k] is not mode:
            continue
        # a BatchNorm without running statistics normalises by the batch in both modes
        if node.target is aten.batch_norm.default and node.args[_BATCH_NORM_RUNNING_MEAN] is None:
            continue
        out.append(node)
    return out


def captured_mode(graph: fx.Graph) -> bool | None:
    """The mode a graph from torch.export was captured in, from its mode-dependent ops (None: none)."""
    if any(_is_counter_add(n) for n in graph.nodes):
        return True
    flags = {n.args[TRAIN_ARG[n.target]] for n in graph.nodes
             if n.op == "call_function" and n.target in TRAIN_ARG and len(n.args) > TRAIN_ARG[n.target]
             and not (n.target is aten.batch_norm.default and n.args[_BATCH_NORM_RUNNING_MEAN] is None)}
    flags &= {True, False}
    return None if not flags else (True in flags)


def make_switchable(gm: fx.GraphModule, mode: bool) -> bool:
    """Make the dropout, batch-norm and recurrent ops of exported `gm` follow `gm.training`.

    Before (captured in train mode)::

        add_ = torch.ops.aten.add_.Tensor(bn_num_batches_tracked, 1)
        batch_norm = torch.ops.aten.batch_norm.default(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, True, 0.1, 1e-05, False)
        dropout = torch.ops.aten.dropout.default(batch_norm, 0.5, True)

    After::

        _dsd_fx_mode = self._dsd_fx_mode()
        count_batches = dsd_fx_modes_count_batches(bn_num_batches_tracked, _dsd_fx_mode)
        batch_norm = torch.ops.aten.batch_norm.default(x, bn_weight, bn_bias, bn_running_mean, bn_running_var, _dsd_fx_mode, 0.1, 1e-05, False)
        dropout = torch.ops.aten.dropout.default(batch_norm, 0.5, _dsd_fx_mode)

    Returns whether the graph changed. `mode` is the mode `gm` was captured in. Running-statistics
    buffers stay the model's own: batch norm updates them in place in train mode.
    """
    g = gm.graph
    sites = _sites(g, mode)
    adds = [n for n in g.nodes if _is_counter_add(n)]
    # captured in train mode, a positive attention dropout is the train-mode branch of the model's own
    # `p if self.training else 0.0`; captured in eval mode, that p is 0.0 and lost (see capture)
    attention = [n for n in g.nodes if mode and (found := _dropout_p(n)) is not None
                 and isinstance(found[0], float) and found[0] > 0]
    if not sites and not adds and not attention:
        return False
    if MODE not in gm._modules:
        gm.add_module(MODE, ModeFlag())
    gm._modules[MODE].training = mode
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    anchor = placeholders[-1].next if placeholders else next(iter(g.nodes))
    with g.inserting_before(anchor):
        flag = g.call_module(MODE, ())
    for add in adds:
        with g.inserting_before(add):
            g.call_function(count_batches, (add.args[0], flag))
        g.erase_node(add)
    for node in attention:
        p, where = _dropout_p(node)
        with g.inserting_before(node):
            follow = g.call_function(when_training, (p, flag))
        if isinstance(where, int):
            node.update_arg(where, follow)
        else:
            node.update_kwarg(where, follow)
    counted = {n.args[0].target for n in g.nodes if n.op == "call_function" and n.target is count_batches}
    for node in sites:
        k = TRAIN_ARG[node.target]
        node.update_arg(k, flag)
        if node.target is aten.batch_norm.default and not mode:
            # captured in eval: the count that train mode makes was not traced; put it back
            mean = node.args[_BATCH_NORM_RUNNING_MEAN]
            path = mean.target.rpartition(".")[0] if isinstance(mean, fx.Node) and mean.op == "get_attr" else None
            target = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
            if path is not None and target not in counted and _has_buffer(gm, target):
                with g.inserting_before(node):
                    g.call_function(count_batches, (g.get_attr(target), flag))
                counted.add(target)
    return True


def _has_buffer(gm: nn.Module, target: str) -> bool:
    path, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(path) if path else gm
    except AttributeError:
        return False
    return owner._buffers.get(name) is not None

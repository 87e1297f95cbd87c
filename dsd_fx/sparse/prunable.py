"""Which weights are prunable: one WeightUse per use of a parameter by a matmul-like op."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch import fx

from dsd_fx.op_table import EINSUM, OpRow, Slot, einsum_slots, function_row, module_row, slot_arg

@dataclass(frozen=True)
class WeightUse:
    """One use of a prunable parameter: `node` consumes it (a call_module or a get_attr node).

    For a call_module use, `param` is the parameter's name inside that module ("weight",
    "weight_hh_l0", "self_attn.out_proj.weight", ...).
    """

    node: fx.Node
    row: OpRow
    reduction_dim: int | None  # None: several contracted dims (an einsum), no single N:M direction
    param: str = "weight"

    @property
    def kind(self) -> str:
        return self.row.kind


@dataclass
class PrunableWeight:
    """A parameter with at least one matmul-like use, and where its mask will live."""

    name: str  # qualified parameter name, e.g. "encoder.0.fc1.weight"
    param: torch.nn.Parameter
    uses: list[WeightUse] = field(default_factory=list)
    getattrs: list[fx.Node] = field(default_factory=list)  # every get_attr node of this parameter
    modules: list[fx.Node] = field(default_factory=list)  # call_module nodes to make functional
    aliases: set[str] = field(default_factory=set)

    @property
    def layer(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def mask_name(self) -> str:
        return f"{self.name}_mask"

    def names(self) -> set[str]:
        out = {self.name, self.layer}
        for alias in self.aliases:
            out |= {alias, alias.rpartition(".")[0]}
        return out - {""}


def resolve(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for atom in target.split("."):
        if not hasattr(obj, atom):
            return None
        obj = getattr(obj, atom)
    return obj


def module_weights(module: nn.Module) -> list[tuple[str, OpRow, Slot]]:
    """(parameter name inside `module`, row, slot) of every prunable weight a call of `module`
    reads: its own (Linear, Conv, LSTM, MultiheadAttention, ...) and its children's (a
    TransformerEncoderLayer's attention and feed-forward weights)."""
    row = module_row(module)
    if row is not None and row.functional is not None:
        return [(s.name, row, s) for s in row.slots_of(module)]
    out = [(s.name, row, s) for s in row.slots_of(module)] if row is not None else []
    for child_name, child in module.named_children():
        out += [(f"{child_name}.{n}", r, s) for n, r, s in module_weights(child)]
    return out


def find_prunable(gm: fx.GraphModule) -> list[PrunableWeight]:
    """Every parameter of `gm` used by a matmul-like op, in graph order, with all its uses."""
    canonical = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    found: dict[int, PrunableWeight] = {}

    def entry(param: torch.nn.Parameter, name: str) -> PrunableWeight:
        pw = found.get(id(param))
        if pw is None:
            pw = found[id(param)] = PrunableWeight(canonical.get(id(param), name), param)
        if name != pw.name:
            pw.aliases.add(name)
        return pw

    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for pname, row, slot in module_weights(module):
                param = module.get_parameter(pname)
                if param.dim() < 2:
                    continue
                pw = entry(param, f"{node.target}.{pname}")
                dim = None if slot.reduction is None else slot.reduction % param.dim()
                pw.uses.append(WeightUse(node, row, dim, pname))
                if node not in pw.modules:
                    pw.modules.append(node)
            continue
        row = function_row(node)
        if row is None:
            continue
        if row is EINSUM and not isinstance(node.args[0], str):
            continue
        for slot in einsum_slots(node) if row is EINSUM else row.slots_of():
            arg = slot_arg(node, slot)
            # a list slot (aten.lstm's params): every 2-d parameter in it is a weight of the slot
            for a in arg if isinstance(arg, (list, tuple)) else (arg,):
                if not isinstance(a, fx.Node) or a.op != "get_attr":
                    continue
                param = resolve(gm, a.target)
                if not isinstance(param, torch.nn.Parameter) or param.dim() < 2:
                    continue
                dim = None if slot.reduction is None else slot.reduction % param.dim()
                entry(param, a.target).uses.append(WeightUse(a, row, dim))
    # a parameter handed to a higher-order op (torch.export's wrap_with_set_grad_enabled for a
    # `with torch.no_grad():` block, cond, ...) is used inside its subgraph: masked where it is read
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for getter, row, slot in subgraph_weight_uses(gm, node):
            param = resolve(gm, getter.target)
            if isinstance(param, torch.nn.Parameter) and param.dim() >= 2:
                dim = None if slot.reduction is None else slot.reduction % param.dim()
                # the gradient comes back through the higher-order op: not known to be fresh
                entry(param, getter.target).uses.append(WeightUse(getter, replace(row, fresh_grad=False), dim))
    # every get_attr of a selected parameter gets the mask, whatever op reads it
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = resolve(gm, node.target)
            if isinstance(obj, torch.nn.Parameter) and id(obj) in found:
                found[id(obj)].getattrs.append(node)
                if node.target != found[id(obj)].name:
                    found[id(obj)].aliases.add(node.target)
    return list(found.values())


def _flat_nodes(args) -> list:
    out = []
    for a in args:
        out += _flat_nodes(a) if isinstance(a, (list, tuple)) else [a]
    return out


def subgraph_weight_uses(gm: fx.GraphModule, hop: fx.Node) -> list[tuple[fx.Node, OpRow, Slot]]:
    """(get_attr node in `gm`, row, slot) of each parameter that higher-order op `hop` hands to a
    subgraph where an op of the table reads it as a weight. The operands after the last subgraph
    argument are the subgraphs' inputs, in order (wrap_with_set_grad_enabled(enabled, body, *args),
    cond(pred, true_fn, false_fn, operands), ...); a subgraph whose inputs do not line up is skipped."""
    args = list(hop.args)
    subs = [k for k, a in enumerate(args) if isinstance(a, fx.Node) and a.op == "get_attr"
            and isinstance(resolve(gm, a.target), fx.GraphModule)]
    if not subs:
        return []
    operands = _flat_nodes(args[subs[-1] + 1:])
    out = []
    for k in subs:
        sub = resolve(gm, args[k].target)
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(inputs) != len(operands):
            continue
        for placeholder, operand in zip(inputs, operands):
            if isinstance(operand, fx.Node) and operand.op == "get_attr":
                out += [(operand, row, slot) for row, slot in _reads_as_weight(sub, placeholder)]
    return out


def _reads_as_weight(sub: fx.GraphModule, value: fx.Node) -> list[tuple[OpRow, Slot]]:
    """The (row, slot) of each op of `sub` that reads `value` as a weight, nested subgraphs included."""
    out = []
    for user in value.users:
        row = function_row(user)
        if row is not None and not (row is EINSUM and not isinstance(user.args[0], str)):
            for slot in einsum_slots(user) if row is EINSUM else row.slots_of():
                arg = slot_arg(user, slot)
                if value is arg or (isinstance(arg, (list, tuple)) and any(value is a for a in arg)):
                    out.append((row, slot))
        elif user.op == "call_function" and isinstance(user.target, torch._ops.HigherOrderOperator):
            args = list(user.args)
            subs = [k for k, a in enumerate(args) if isinstance(a, fx.Node) and a.op == "get_attr"
                    and isinstance(resolve(sub, a.target), fx.GraphModule)]
            operands = _flat_nodes(args[subs[-1] + 1:]) if subs else []
            for k in subs:
                inner = resolve(sub, args[k].target)
                inputs = [n for n in inner.graph.nodes if n.op == "placeholder"]
                if len(inputs) == len(operands):
                    out += [u for ph, op in zip(inputs, operands) if op is value for u in _reads_as_weight(inner, ph)]
    return out

"""Which weights are prunable: one WeightUse per use of a parameter by a matmul-like op."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    # every get_attr of a selected parameter gets the mask, whatever op reads it
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = resolve(gm, node.target)
            if isinstance(obj, torch.nn.Parameter) and id(obj) in found:
                found[id(obj)].getattrs.append(node)
                if node.target != found[id(obj)].name:
                    found[id(obj)].aliases.add(node.target)
    return list(found.values())

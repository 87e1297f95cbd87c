from __future__ import annotations

import copy
import socket

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx



def refuse_network(*args, **kwargs):
    raise AssertionError("the code under test touched the network")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket or connection raises: a loader that downloads fails the test."""
    monkeypatch.setattr(socket, "socket", refuse_network)
    monkeypatch.setattr(socket, "create_connection", refuse_network)


def prove_once(proven: str | None, reference, dense, args: tuple, label: str) -> str:
    """The first re-densed graph of a loop of methods is proven against `reference` in ONNX; every later
    one must be the same graph (its ONNX export is then the same translation). Returns the proven code."""
    import dsd_fx

    if proven is None:
        report = dsd_fx.verify_zero_overhead(reference, dense, args, latency_runs=2)
        assert report.ok, report.table
        return dense.code
    assert dense.code == proven, label
    return proven

class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.c1d = nn.Conv1d(4, 4, 3)
        self.c3d = nn.Conv3d(1, 2, 1)
        self.t1d = nn.ConvTranspose1d(4, 2, 2, bias=False)
        self.t3d = nn.ConvTranspose3d(2, 1, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.up(F.relu(self.conv2(F.relu(self.conv1(x)))))  # (B, 4, 16, 16)
        s = self.t1d(self.c1d(y.flatten(2)))  # (B, 2, L)
        v = self.t3d(self.c3d(y[:, :1].unsqueeze(1)))  # (B, 1, 1, 16, 16)
        return self.head(y.mean((2, 3))) + s.mean() + v.mean()


class Functional(nn.Module):
    """Weights used through get_attr: F.linear, F.conv2d, matmul, @, mm, addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(0.3 * torch.randn(16, 8))
        self.b1 = nn.Parameter(0.3 * torch.randn(16))
        self.w2 = nn.Parameter(0.3 * torch.randn(16, 12))  # (in, out) used through addmm, like GPT-2's Conv1D
        self.w3 = nn.Parameter(0.3 * torch.randn(12, 12))
        self.w4 = nn.Parameter(0.3 * torch.randn(12, 6))
        self.w5 = nn.Parameter(0.3 * torch.randn(6, 6))
        self.k = nn.Parameter(0.3 * torch.randn(4, 3, 3, 3))
        self.bias2 = nn.Parameter(torch.zeros(12))

    def forward(self, x, img):
        h = F.linear(x, self.w1, self.b1)
        h = torch.addmm(self.bias2, h, self.w2)
        h = torch.matmul(h, self.w3)
        h = h @ self.w4
        h = torch.mm(h, self.w5)
        return h, F.conv2d(img, self.k, padding=1)


def mlp_args():
    return (torch.randn(5, 8),)


def cnn_args():
    return (torch.randn(2, 3, 8, 8),)


def functional_args():
    return (torch.randn(5, 8), torch.randn(2, 3, 6, 6))


ZOO = {
    "mlp": (TinyMLP, mlp_args),
    "cnn": (TinyCNN, cnn_args),
    "functional": (Functional, functional_args),
}


@pytest.fixture(params=sorted(ZOO))
def zoo(request):
    torch.manual_seed(0)
    cls, make_args = ZOO[request.param]
    return cls(), make_args()


def snapshot(model: nn.Module) -> dict:
    """Everything a failed transform must leave alone: tensors (by value and identity), buffers, code."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "code": model.code if isinstance(model, fx.GraphModule) else None,
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["ids"] == snap["ids"]
    assert now["modules"] == snap["modules"]
    assert now["code"] == snap["code"]
    for k, v in snap["state"].items():
        torch.testing.assert_close(now["state"][k], v, rtol=0, atol=0, equal_nan=True)


def fx_nx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as networkx, nodes labelled by (op, target), edges by argument position."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "placeholder":
            target = f"placeholder:{node.target}"
        g.add_node(node.name, label=(node.op, target))
        for pos, inp in enumerate(node.all_input_nodes):
            g.add_edge(inp.name, node.name, pos=pos)
    return g


def isomorphic(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    return nx.is_isomorphic(
        fx_nx(a), fx_nx(b), node_match=lambda x, y: x["label"] == y["label"], edge_match=lambda x, y: x["pos"] == y["pos"]
    )


def masked_reference(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `model` whose weights are multiplied by `masks`, computed independently of dsd_fx."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return ref


def assert_rejected(kwargs: dict, exc: type, words: list[str], model: nn.Module | None = None) -> None:
    """transform(model, **kwargs) raises `exc` whose message holds every word, and changes nothing."""
    import dsd_fx

    model = TinyMLP() if model is None else model
    snap = snapshot(model)
    with pytest.raises(exc) as err:
        dsd_fx.transform(model, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert_unchanged(model, snap)

"""capture: a fresh graph over the model's own parameters; tracing failures that name their remedy."""
import pytest
import torch
import torch.nn as nn

import dsd_fx
from dsd_fx.infra.graph_capture import capture


class CausalFromShape(nn.Module):
    """GPT-style: the causal mask built from the input's length, which symbolic_trace cannot follow."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T), 1).bool()
        return (q @ k.transpose(1, 2)).masked_fill(mask, float("-inf")).softmax(-1) @ v


def causal_mask(x):
    T = x.shape[1]
    return torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)


torch.fx.wrap("causal_mask")


class CausalFromScores(CausalFromShape):
    """README's first remedy: the mask made from a tensor of the right shape, not from a Python int."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(1, 2)
        mask = torch.ones_like(scores, dtype=torch.bool).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class CausalFromWrapped(CausalFromShape):
    """README's second remedy: the mask built in a function fx does not enter (torch.fx.wrap)."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return (q @ k.transpose(1, 2)).masked_fill(causal_mask(x), float("-inf")).softmax(-1) @ v


def test_shares_the_parameter_objects():
    model = nn.Sequential(nn.Linear(3, 4))
    gm = capture(model)
    assert gm.get_parameter("0.weight") is model[0].weight
    assert capture(model, copy=True).get_parameter("0.weight") is not model[0].weight


def test_causal_mask_from_the_input_shape_names_the_remedies():
    with pytest.raises(TypeError, match="could not trace.*concrete_args"):
        dsd_fx.transform(CausalFromShape())


@pytest.mark.parametrize("cls", [CausalFromScores, CausalFromWrapped])
def test_the_causal_mask_remedies_trace_for_every_length(cls):
    dense = dsd_fx.transform(dsd_fx.transform(cls(), sparsity=0.5), phase="dense")
    reference = CausalFromShape()  # eager, with the re-dense weights
    reference.load_state_dict(dense.state_dict())
    for length in (3, 7):
        x = torch.randn(2, length, 8)
        torch.testing.assert_close(dense(x), reference(x))

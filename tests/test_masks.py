import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsd_fx.masks import global_magnitude_masks, magnitude_mask


def reference_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Plain-Python DSD mask: prune the round(s*N) smallest |w|, lowest index first among ties."""
    flat = w.detach().abs().flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    keep = [1.0] * len(flat)
    for i in order[: round(sparsity * len(flat))]:
        keep[i] = 0.0
    return torch.tensor(keep, dtype=w.dtype).view(w.shape)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    sparsity=st.floats(0.0, 0.99),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_magnitude_mask_matches_reference(rows, cols, sparsity, ties, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct magnitudes, both signs: many ties
        w = torch.randint(-2, 3, (rows, cols), generator=g).float()
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == w.dtype and mask.shape == w.shape
    assert int((mask == 0).sum()) == round(sparsity * w.numel())
    torch.testing.assert_close(mask, reference_mask(w, sparsity), rtol=0, atol=0)


def test_keeps_largest_magnitudes():
    w = torch.tensor([[0.1, -5.0, 0.3], [-0.2, 4.0, 0.05]])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]


def test_ties_break_toward_lower_index():
    w = torch.ones(2, 4)
    assert magnitude_mask(w, 0.25).flatten().tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_zero_sparsity_keeps_all():
    assert bool(magnitude_mask(torch.randn(3, 3), 0.0).all())


def test_global_ranks_all_weights_together():
    small = torch.full((4, 4), 0.01)
    large = torch.full((4, 4), 10.0)
    a, b = global_magnitude_masks([small, large], 0.5)
    assert int(a.sum()) == 0 and int(b.sum()) == 16  # all pruning lands on the small layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mask_dtype_follows_weight(dtype):
    w = torch.randn(8, 8).to(dtype)
    mask = magnitude_mask(w, 0.5)
    assert mask.dtype == dtype and int((mask == 0).sum()) == 32

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsd_fx.sparse.masks import global_magnitude_masks, magnitude_mask


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


# ---------------------------------------------------------------- N:M selection

from dsd_fx.sparse.masks import nm_keep, nm_mask, nm_sparsify  # noqa: E402


def former_nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """nm_mask as it was before the pairwise-rank selection (commit e8b1f65), kept as the reference."""
    v = weight.detach().movedim(dim, -1)
    if v.shape[-1] % m:
        raise ValueError(f"reduction size {v.shape[-1]} is not divisible by m={m}")
    groups = v.abs().reshape(-1, m)
    if m <= 8:
        cols = groups.unbind(1)
        keep = []
        for i in range(m):
            rank = torch.zeros_like(cols[i], dtype=torch.uint8)
            for j in range(m):
                if j != i:
                    rank += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
            keep.append(rank < n)
        mask = torch.stack(keep, 1)
    else:
        keep_idx = torch.sort(groups.float(), dim=1, descending=True, stable=True).indices[:, :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep_idx, True)
    return mask.view(v.shape).movedim(-1, dim).to(weight.dtype)


@st.composite
def nm_weights(draw, max_m: int = 8):
    m = draw(st.integers(2, max_m))
    n = draw(st.integers(1, m - 1))
    rank = draw(st.integers(1, 4))
    dim = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    shape[dim] = m * draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "integers", "few values", "zeros and infs"]))
    if kind == "normal":
        w = torch.randn(shape, generator=g)
    elif kind == "integers":  # many ties, both signs
        w = torch.randint(-3, 4, shape, generator=g).float()
    elif kind == "few values":  # nearly all tied
        w = torch.randint(0, 2, shape, generator=g).float() * 0.5 - 0.25
    else:
        w = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf")])[torch.randint(0, 6, shape, generator=g)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    return w.to(dtype), n, m, dim


@settings(max_examples=300, deadline=None)
@given(case=nm_weights())
def test_pairwise_selection_gives_the_former_masks(case):
    w, n, m, dim = case
    mask = nm_mask(w, n, m, dim)
    expected = former_nm_mask(w, n, m, dim)
    assert mask.dtype == w.dtype and mask.shape == w.shape
    assert torch.equal(mask, expected)
    assert bool((mask.movedim(dim, -1).reshape(-1, m).sum(1) == n).all())


@settings(max_examples=150, deadline=None)
@given(case=nm_weights(), transposed=st.booleans())
def test_nm_sparsify_is_w_times_the_former_mask_bitwise(case, transposed):
    w, n, m, dim = case
    if transposed and w.dim() == 2:  # a non-contiguous weight keeps its own layout
        w, dim = w.t(), 1 - dim
    out = nm_sparsify(w, n, m, dim)
    expected = w * former_nm_mask(w, n, m, dim)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert [st for st, size in zip(out.stride(), w.shape) if size > 1] == [st for st, size in zip(w.stride(), w.shape) if size > 1]
    # the same values and the same signed zeros (0 * -w is -0.0 in both)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)  # inf * 0 is NaN in both
    finite = ~torch.isnan(expected)
    assert torch.equal(torch.signbit(out)[finite], torch.signbit(expected)[finite])


@pytest.mark.parametrize("m", [9, 12, 16])
def test_large_m_uses_the_stable_sort_with_the_same_ties(m):
    w = torch.randint(-2, 3, (5, 2 * m)).float()
    for n in (1, m // 2, m - 1):
        assert torch.equal(nm_mask(w, n, m, 1), former_nm_mask(w, n, m, 1))
        assert torch.equal(nm_sparsify(w, n, m, 1), w * former_nm_mask(w, n, m, 1))


def test_nm_keep_ties_go_to_the_lowest_index():
    mags = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 3.0, 3.0]])
    assert nm_keep(mags, 2).tolist() == [[True, True, False, False], [False, True, True, False], [True, False, True, False]]


def test_not_divisible_raises_naming_m():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nm_mask(torch.randn(3, 6), 2, 4, 1)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nm_sparsify(torch.randn(3, 6), 2, 4, 1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 8), (5, 8)])
def test_selection_compiles_without_a_graph_break(n, m):
    torch._dynamo.reset()
    w = torch.randint(-3, 4, (8, 4 * m)).float()
    explained = torch._dynamo.explain(nm_sparsify)(w, n, m, 1)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(nm_mask, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w, n, m, 1), former_nm_mask(w, n, m, 1))

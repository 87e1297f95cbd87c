"""Grow-Push-Prune's push: tap a deep layer, add a deep-LDA objective to the user's loss, score the tapped units.

Sources: the scatter matrices and the per-neuron utility are CVIU21 §3 (Tian, Arbel, Clark, "Task
dependent deep LDA pruning of neural networks", arXiv 1803.08134); the push's three aims (separate the
classes, penalise covariances between neurons, align the discriminants with a compact set of neurons)
are GPP's abstract (arXiv 2009.13716), whose formula is not in the sources; the "deeplda" criterion is
DeepLDA's objective (Dorfer, Kelz, Widmer, arXiv 1511.04707, as in the authors' code). What is
inferred here: the default log-det criterion, the scale-free ridge and its size, and the correlation penalty.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import fx

from dsd_fx.infra.graph_capture import capture
from dsd_fx.passes.insert_taps import PASS as INSERT_TAPS, insert_taps, plan_taps
from dsd_fx.infra.pipeline import run_passes
from dsd_fx.tags import persist
from dsd_fx.taps import TapRecorder, recorder_of

log = logging.getLogger(__name__)

RIDGE = 1e-3  # r = RIDGE * tr(S_t) / d: scale-free, so the eigenvalues do not depend on the features' scale
# The push's ridge (PushConfig.ridge), a shrinkage of S_w towards (tr(S_t) / d) I as in regularised
# discriminant analysis (Friedman 1989), larger than the utility's RIDGE because the push sees one
# mini-batch: with d >= B (MNIST-1D's CNN taps d = 160 features, batches of B = 100) S_w has rank at most
# B - C and the (at least) d - B + C directions where it is 0 get v ~ S_b / r. Measured at that CNN's dense
# solution (benchmarks/results_gpp_push.txt): with 1e-3 the log-det was 5.0 on a batch but 1.34 on the
# 1000 test samples, and its gradient was 2.7-4.2 times cross-entropy's, almost orthogonal to it
# (cosine 0.08-0.13); with 0.1, 1.85 on a batch, 1.12 on the test set, a gradient 1.0-1.4 times
# cross-entropy's. 0.1 is tuned on that benchmark (0.03 and 0.3 within noise of it, 0.01 worse), not from a source.
PUSH_RIDGE = 0.1
MARGIN = 1.0  # DeepLDA's epsilon (1 in the authors' code): eigenvalues within it of the smallest are averaged
_TINY = 1e-12  # keeps S_w + rI positive definite when a batch has no spread at all (tr(S_t) = 0)
CRITERIA = ("log_det", "deeplda")


@dataclass(frozen=True)
class PushConfig:
    """The push objective's options (see push_objective)."""

    criterion: str = "log_det"
    ridge: float = PUSH_RIDGE
    margin: float = MARGIN
    decorrelation: float = 1.0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"push: unknown criterion {self.criterion!r}; use 'log_det' (default) or 'deeplda'")
        if not self.ridge > 0:
            raise ValueError(f"push: ridge={self.ridge!r} must be > 0: it keeps S_w + rI invertible; {PUSH_RIDGE} is the default")
        if not self.margin >= 0:
            raise ValueError(f"push: margin={self.margin!r} must be >= 0 (DeepLDA's epsilon; 1.0 is the authors')")
        if not self.decorrelation >= 0:
            raise ValueError(f"push: decorrelation={self.decorrelation!r} must be >= 0; 0 turns the covariance penalty off")


def tap_push(
    model: torch.nn.Module, taps: Sequence[str] | None = None, *, copy: bool = False,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture `model` and tap the chosen layers (default: the final classifier's input) for `push_loss`:
    what `transform(model, phase="push", taps=...)` does, for code below the transform (importance).

    The GraphModule shares the model's parameters (unless `copy=True`) and computes bitwise the same
    outputs; each forward records the tapped activations for `push_loss(gm, labels)`.
    """
    taps = None if taps is None else list(taps)
    gm = capture(model, copy=copy, concrete_args=concrete_args)
    plan_taps(gm, taps)  # a bad tap list raises before any change
    gm.meta["dsd_fx"] = {"changes": run_passes(gm, [(INSERT_TAPS, functools.partial(insert_taps, taps=taps))])}
    persist(gm)
    return gm


def pooled(x: torch.Tensor, name: str = "features") -> torch.Tensor:
    """(B, C) features of a tapped activation: (B, C) as is, (B, C, *spatial) globally average-pooled."""
    if x.dim() < 2:
        raise ValueError(f"tap {name!r}: activations of shape {tuple(x.shape)} have no (batch, channel) dims; tap a layer with (B, C, ...) output")
    return x if x.dim() == 2 else x.flatten(2).mean(-1)


def scatter(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S_w, S_b, classes present) of features `x` (B, d): CVIU21 §3's scatter matrices.

    S_w = sum_c X~_c^T X~_c with X~_c the class-c rows centred on their class mean; S_b = S_t - S_w,
    computed as sum_c n_c (mu_c - mu)(mu_c - mu)^T, which is the same matrix and exactly symmetric PSD.
    A class with one sample adds nothing to S_w; a class absent from the batch adds nothing at all.
    """
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = counts.to(x.dtype)[:, None]
    means = x.new_zeros(len(classes), x.shape[1]).index_add_(0, inverse, x) / n
    within = x - means[inverse]
    spread = means - x.mean(0)
    return within.T @ within, (spread * n).T @ spread, len(classes)


def _ridge(s_w: torch.Tensor, s_b: torch.Tensor, ridge: float) -> torch.Tensor:
    return ridge * (torch.diagonal(s_w).sum() + torch.diagonal(s_b).sum()) / s_w.shape[0] + _TINY


def _ridge_eye(s_w: torch.Tensor, s_b: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge rI added to S_w (and S_t): r = ridge * tr(S_t) / d + 1e-12."""
    return _ridge(s_w, s_b, ridge) * torch.eye(s_w.shape[0], dtype=s_w.dtype, device=s_w.device)


def _whitened(s_w: torch.Tensor, s_b: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, L): L the Cholesky factor of S_w + rI and M = L^-1 S_b L^-T, symmetric, with the eigenvalues of
    S_b e = v (S_w + rI) e. eigvalsh of M has a stable gradient (V diag(dv) V^T: no 1/(v_i - v_j) terms
    when only eigenvalues are used), where a general eigensolver of (S_w + rI)^-1 S_b would not."""
    chol, _ = torch.linalg.cholesky_ex(s_w + _ridge_eye(s_w, s_b, ridge))
    half = torch.linalg.solve_triangular(chol, s_b, upper=False)
    m = torch.linalg.solve_triangular(chol, half.T, upper=False)
    return (m + m.T) / 2, chol


def fisher_eigenvalues(s_w: torch.Tensor, s_b: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues v and eigenvectors E (columns) of S_b e = v (S_w + rI) e; E^T (S_w + rI) E = I."""
    m, chol = _whitened(s_w, s_b, ridge)
    values, vectors = torch.linalg.eigh(m)
    return values, torch.linalg.solve_triangular(chol.T, vectors, upper=True)


def _log_det_ratio(s_w: torch.Tensor, s_b: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """(log|S_t + rI| - log|S_w + rI|) / k = mean over the k non-trivial v_i of log(1 + v_i): two Cholesky
    factorisations, no eigendecomposition (S_b's other eigenvalues are 0 and add log 1 = 0)."""
    eye = _ridge_eye(s_w, s_b, ridge)
    within = torch.linalg.cholesky_ex(s_w + eye)[0]
    total = torch.linalg.cholesky_ex(s_w + s_b + eye)[0]
    return 2 * (torch.diagonal(total).log().sum() - torch.diagonal(within).log().sum()) / k


def _deeplda(s_w: torch.Tensor, s_b: torch.Tensor, k: int, ridge: float, margin: float) -> torch.Tensor:
    """DeepLDA's term: the mean of the k non-trivial v_i that lie within `margin` of the smallest of them."""
    top = torch.linalg.eigvalsh(_whitened(s_w, s_b, ridge)[0])[-k:]  # rank S_b <= classes - 1: the rest are 0
    chosen = (top <= top[0].detach() + margin).to(top.dtype)  # a mask, not indexing: no dynamic shape
    return (top * chosen).sum() / chosen.sum()


def _separation(s_w: torch.Tensor, s_b: torch.Tensor, classes: int, criterion: str, ridge: float, margin: float) -> torch.Tensor:
    k = min(classes - 1, s_w.shape[0])
    if k < 1:  # one class in the batch: no between-class scatter to measure
        return s_b.sum() * 0
    return _log_det_ratio(s_w, s_b, k, ridge) if criterion == "log_det" else _deeplda(s_w, s_b, k, ridge, margin)


def _off_diagonal(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation of S + rI: S_ij^2 / ((S_ii + r)(S_jj + r)), i != j, in [0, 1)."""
    d = s.shape[0]
    if d < 2:
        return s.sum() * 0
    diag = torch.diagonal(s) + r
    rho2 = s.square() / (diag[:, None] * diag[None, :])
    return (rho2.sum() - torch.diagonal(rho2).sum()) / (d * (d - 1))


def push_objective(
    features: torch.Tensor, labels: torch.Tensor, config: PushConfig | None = None, **options: Any,
) -> torch.Tensor:
    """The push objective of one batch of features (B, C, ...); lower is better. Options: PushConfig's.

    -separation + decorrelation * (offdiag(S_w) + offdiag(S_b)) / 2, in float64, returned in the
    features' dtype (float32 for half-precision features); v_i are the k = min(C_batch - 1, d) non-trivial eigenvalues of S_b e = v (S_w + rI) e,
    r = ridge * tr(S_t) / d + 1e-12 with ridge = PUSH_RIDGE = 0.1 by default (see PUSH_RIDGE: a batch's
    S_w is singular when d >= B - C + 1, and a small ridge rewards separation in its null space that
    does not hold beyond the batch; inferred and tuned, as is the push weight 1.0 with it).

    separation, criterion="log_det" (default): mean_i log(1 + v_i) = (log|S_t + rI| - log|S_w + rI|) / k,
        the log of Fisher's determinant ratio (CVIU21 §3) over the discriminant subspace. Two Cholesky
        factorisations and no eigendecomposition (which CVIU21 §5 calls expensive and unstable in
        training); concave in v, so, like DeepLDA's choice of the smallest eigenvalues, it pushes the
        weakest discriminant hardest, without DeepLDA's discrete selection; it grows like log v, at most
        log(1 + tr(S_b) / r) <= log(1 + d / ridge) per eigenvalue, so with the default ridge its gradient
        stays in cross-entropy's range. In our training check it raised the Fisher ratio faster than
        DeepLDA's criterion did.
    criterion="deeplda": DeepLDA's mean of the v_i within `margin` of the smallest v_i. Linear in v, so
        with a small ridge its gradient is hundreds of times cross-entropy's (measured: 220-360 times
        at ridge 1e-3 on the CNN above); at ridge 1, weight 0.3, decorrelation 0 it did as well as the
        default on that benchmark.
    offdiag(S) is the mean squared correlation S_ij^2 / ((S_ii + r)(S_jj + r)), i != j, in [0, 1): it
        penalises covariances between neurons within classes and between class means, scale-free. With
        both matrices diagonal the Fisher directions are single neurons, each with v = sigma_b^2 /
        sigma_w^2 (CVIU21's observation, made a target), and as rank S_b <= C - 1 all class information
        sits on at most C - 1 neurons: the compact set GPP pushes towards.
    Finite for any batch: one sample, one class, classes with one sample, more neurons than samples.
    """
    cfg = PushConfig(**options) if config is None else config
    if config is not None and options:
        raise TypeError("push_objective: give either config= or the individual options, not both")
    x = pooled(features).double()
    y = labels.reshape(-1)
    if y.shape[0] != x.shape[0] or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"push_objective: labels must be {x.shape[0]} integer class ids (one per sample), got shape "
            f"{tuple(labels.shape)} of {labels.dtype}; pass the batch's class ids, not one-hot or logits"
        )
    s_w, s_b, classes = scatter(x, y.to(x.device))
    loss = -_separation(s_w, s_b, classes, cfg.criterion, cfg.ridge, cfg.margin)
    if cfg.decorrelation:
        r = _ridge(s_w, s_b, cfg.ridge)
        loss = loss + cfg.decorrelation * (_off_diagonal(s_w, r) + _off_diagonal(s_b, r)) / 2
    return loss.to(torch.promote_types(features.dtype, torch.float32))  # fp16/bf16 features: a float32 loss


def _recorded(gm: fx.GraphModule, taps: Sequence[str] | None) -> dict[str, torch.Tensor]:
    rec = recorder_of(gm)
    if rec is None or not rec.names:
        raise ValueError(
            f"push_loss: {type(gm).__name__} has no taps; make the push graph with dsd_fx.transform(model, phase='push') "
            "(or transform(model, phase='push')) and train that"
        )
    names = rec.names if taps is None else tuple(taps)
    unknown = [n for n in names if n not in rec.names]
    if unknown:
        raise ValueError(f"push_loss: no tap named {unknown[0]!r}; this graph's taps are {', '.join(rec.names)}")
    missing = [n for n in names if n not in rec.activations]
    if missing:
        raise ValueError(
            f"push_loss: tap {missing[0]!r} has recorded nothing yet; run the batch through the graph "
            "(out = gm(inputs)) before push_loss(gm, labels)"
        )
    return {n: rec.activations[n] for n in names}


def gathered(x: torch.Tensor, labels: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of `x` (B_rank, d) and `labels` (B_rank,), concatenated in rank order, for
    batch statistics over the global batch under torch.distributed (DDP). Local batches may differ
    in size. The gradient reaches each rank's own rows: torch.distributed.nn's all_gather sums the
    ranks' gradients of their (equal) losses back, and DDP's averaging of the parameter gradients
    then gives the gradient of the one global-batch loss."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    most = max(int(s) for s in sizes)
    pad = most - x.shape[0]
    rows = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    marks = torch.cat([labels.reshape(-1), labels.new_zeros(pad)]) if pad else labels.reshape(-1)
    every = all_gather(rows, group=group)
    every_labels = [torch.empty_like(marks) for _ in range(world)]
    dist.all_gather(every_labels, marks, group=group)
    n = [int(s) for s in sizes]
    return torch.cat([r[:k] for r, k in zip(every, n)]), torch.cat([m[:k] for m, k in zip(every_labels, n)])


def push_loss(
    gm: fx.GraphModule, labels: torch.Tensor, *, taps: Sequence[str] | None = None,
    config: PushConfig | None = None, sync: bool = False, group: Any = None, **options: Any,
) -> torch.Tensor:
    """The push objective (push_objective) of the batch last run through `gm`, averaged over its taps.

    Add it to your loss with a weight: `loss = F.cross_entropy(gm(x), y) + w * push_loss(gm, y)`; it
    decreases as the tapped layer's classes separate and its neurons decorrelate. `taps` picks some of
    the taps by name; options are PushConfig's (criterion, ridge, margin, decorrelation). It runs
    eagerly: its class count is data-dependent, so torch.compile would break the graph before it
    (compile the model, whose taps compile without a break, and call this outside).

    sync=True (under torch.distributed, e.g. DDP): the scatter matrices are those of the global
    batch, every rank's pooled features and labels gathered (`gathered`; `group`: the process
    group, default the world), so that every rank computes the same loss and the training step is
    the one-process step over the global batch; without it each rank uses its local batch (like
    BatchNorm without SyncBatchNorm). Ignored where torch.distributed is not initialised.
    """
    cfg = PushConfig(**options) if config is None else config
    acts = _recorded(gm, taps)
    losses = []
    for name, x in acts.items():
        if labels.numel() != x.shape[0]:
            raise ValueError(
                f"push_loss: tap {name!r} recorded a batch of {x.shape[0]} but labels has {labels.numel()} entries; "
                "pass the labels of the batch last run through the graph"
            )
        feats, marks = pooled(x, name), labels
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            feats, marks = gathered(feats, labels, group)
        losses.append(push_objective(feats, marks, cfg))
    return torch.stack(losses).mean()


class _Moments:
    """Running sums of one tap's pooled features, in float64, shifted by the first batch's mean against cancellation."""

    def __init__(self, first: torch.Tensor) -> None:
        self.shift = first.mean(0)
        d = first.shape[1]
        self.n, self.total = 0, first.new_zeros(d)
        self.second = first.new_zeros(d, d)
        self.per_class: dict[int, list] = {}  # label -> [count, sum]

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x - self.shift
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.second += x.T @ x
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        sums = x.new_zeros(len(classes), x.shape[1]).index_add_(0, inverse, x)
        for c, k, s in zip(classes.tolist(), counts.tolist(), sums):
            entry = self.per_class.setdefault(c, [0, torch.zeros_like(s)])
            entry[0] += k
            entry[1] += s

    def scatter(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(S_w, S_b, classes) over everything added: S_t = sum x x^T - N mu mu^T, S_b = sum_c n_c mu_c mu_c^T - N mu mu^T."""
        mu = self.total / self.n
        s_t = self.second - self.n * torch.outer(mu, mu)
        s_b = -self.n * torch.outer(mu, mu)
        for k, s in self.per_class.values():
            s_b = s_b + torch.outer(s, s) / k
        s_b = (s_b + s_b.T) / 2
        return (s_t - s_b + (s_t - s_b).T) / 2, s_b, len(self.per_class)


def _ratio_utility(s_w: torch.Tensor, s_b: torch.Tensor, ridge: float) -> torch.Tensor:
    """sigma_b^2(j) / (sigma_w^2(j) + r) per neuron: CVIU21 §3's utility of a pre-decision neuron."""
    return torch.diagonal(s_b) / (torch.diagonal(s_w) + _ridge(s_w, s_b, ridge))


def _fisher_utility(s_w: torch.Tensor, s_b: torch.Tensor, classes: int, ridge: float) -> torch.Tensor:
    """sum_k v_k e_kj^2 over the C - 1 Fisher directions e_k (unit length), in units of each neuron's
    within-class spread, so that a neuron's scale does not decide its score. It equals the ratio
    utility when S_w and S_b are diagonal."""
    a = s_w + _ridge_eye(s_w, s_b, ridge)
    scale = torch.outer(torch.diagonal(a).rsqrt(), torch.diagonal(a).rsqrt())
    values, vectors = fisher_eigenvalues(a * scale, s_b * scale, ridge=0.0)  # S_w + rI: unit diagonal, PD
    k = min(max(classes - 1, 0), s_w.shape[0])
    values, vectors = values[s_w.shape[0] - k:], vectors[:, s_w.shape[0] - k:]
    vectors = vectors / vectors.norm(dim=0, keepdim=True).clamp_min(_TINY)
    return (vectors.square() * values.clamp_min(0)).sum(1)


def _run_batches(gm: fx.GraphModule, data: Iterable, rec: TapRecorder) -> dict[str, _Moments]:
    moments: dict[str, _Moments] = {}
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"tap_utility: batch {i} is a {type(batch).__name__}; data must yield (inputs, labels) pairs")
        inputs, labels = batch
        rec.clear()
        gm(*inputs) if isinstance(inputs, (tuple, list)) else gm(inputs)
        for name in rec.names:
            x = pooled(rec.activations[name], name).double()
            if name not in moments:
                moments[name] = _Moments(x)
            moments[name].add(x, labels.reshape(-1).to(x.device))
    if not moments:
        raise ValueError("tap_utility: data yielded no batch")
    return moments


def tap_utility(
    gm: fx.GraphModule, data: Iterable, *, method: str = "ratio", ridge: float = RIDGE,
) -> dict[str, torch.Tensor]:
    """Discriminant utility of each tapped unit (neuron or channel) over `data`, per tap: {tap: Tensor(C)}.

    `data` yields (inputs, labels) batches (a DataLoader will do); inputs is a tensor or a tuple of the
    graph's inputs. The graph runs in eval mode without gradients (its mode is restored after); S_w and
    S_b are accumulated over all of `data` in float64.
    method="ratio" (default): sigma_b^2(j) / (sigma_w^2(j) + r), CVIU21 §3's observation that in the
        pre-decision layer S_w and S_b are nearly diagonal, so discriminants align with single neurons;
        exact after a push, which makes them diagonal.
    method="fisher": the eigenvalue-weighted squared loadings of the C - 1 Fisher directions, for a
        layer whose neurons are still correlated (before pushing).
    """
    if method not in ("ratio", "fisher"):
        raise ValueError(f"tap_utility: unknown method {method!r}; use 'ratio' (CVIU21's per-neuron ratio) or 'fisher'")
    rec = recorder_of(gm)
    if rec is None or not rec.names:
        raise ValueError(f"tap_utility: {type(gm).__name__} has no taps; tap it first with dsd_fx.transform(model, phase='push')")
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            moments = _run_batches(gm, data, rec)
    finally:
        gm.train(was_training)
        rec.clear()
    out = {}
    for name, m in moments.items():
        s_w, s_b, classes = m.scatter()
        log.debug("tap_utility: tap %s: %d samples, %d classes, %d units", name, m.n, classes, s_w.shape[0])
        out[name] = _ratio_utility(s_w, s_b, ridge) if method == "ratio" else _fisher_utility(s_w, s_b, classes, ridge)
    return out

"""dsd_fx.demo.data: the documented shapes, the same tensors for the same seed, and no network."""
import random
import socket
import sys

import numpy as np
import pytest
import torch

from dsd_fx.demo.data import MissingDataPackage, load_digits, load_mnist1d


@pytest.fixture
def no_network(no_network, monkeypatch):
    """conftest's socket block; mnist1d is imported afresh under it, and its downloader is a trap."""
    for name in [m for m in sys.modules if m == "mnist1d" or m.startswith("mnist1d.")]:
        monkeypatch.delitem(sys.modules, name)
    import mnist1d.data

    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d's downloader was called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)  # it downloads: never to be called


def test_mnist1d_has_the_documented_shapes(no_network):
    (x, y), (xt, yt) = load_mnist1d(0)
    assert x.shape == (4000, 40) and xt.shape == (1000, 40)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert y.shape == (4000,) and yt.shape == (1000,)
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) <= set(range(10))
    all_x = torch.cat([x, xt])
    assert abs(float(all_x.mean())) < 1e-3 and abs(float(all_x.std()) - 1) < 1e-3  # centred, std 1


def test_mnist1d_num_samples_scales_both_splits(no_network):
    (x, y), (xt, yt) = load_mnist1d(1, num_samples=1000)
    assert x.shape == (800, 40) and xt.shape == (200, 40) and len(y) == 800 and len(yt) == 200


def test_mnist1d_is_deterministic_per_seed_without_network(no_network):
    (a, ya), (at, _) = load_mnist1d(3, num_samples=500)
    (b, yb), (bt, _) = load_mnist1d(3, num_samples=500)
    assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(at, bt)
    (c, _), _ = load_mnist1d(4, num_samples=500)
    assert not torch.equal(a, c)


def test_mnist1d_leaves_the_global_generators_as_they_were(no_network):
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(3), [random.random() for _ in range(3)]
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(0, num_samples=100)  # mnist1d seeds numpy's and random's global generators
    assert np.array_equal(np.random.rand(3), expected_np)
    assert [random.random() for _ in range(3)] == expected_py


@pytest.mark.parametrize("kwargs, words", [({"seed": -1}, "seed must be an int >= 0"),
                                           ({"seed": 1.5}, "seed must be an int >= 0"),
                                           ({"num_samples": 5}, "num_samples must be an int >= 20")])
def test_mnist1d_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        load_mnist1d(**kwargs)


def test_mnist1d_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # import fails as if not installed
    with pytest.raises(MissingDataPackage, match=r"pip install 'dsd-fx\[demo\]'"):
        load_mnist1d(0)


def test_digits_has_the_documented_shapes_and_split_per_seed(no_network):
    pytest.importorskip("sklearn")
    (x, y), (xt, yt) = load_digits(0)
    assert x.shape == (1348, 1, 8, 8) and xt.shape == (449, 1, 8, 8) and len(y) == 1348 and len(yt) == 449
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4  # standardised on the train split
    (x2, _), _ = load_digits(0)
    (x3, _), _ = load_digits(1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)

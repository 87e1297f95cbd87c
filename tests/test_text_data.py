"""dsd_fx.demo.text_data: the standard library's sources as bytes, split by file, the same on every call, no network."""
import os
import subprocess
import sys

import pytest
import torch

from dsd_fx.demo.text_data import TextCorpus, is_validation, load_stdlib_corpus, stdlib_files, stdlib_root


def test_same_split_on_every_call_without_network(no_network):
    a = load_stdlib_corpus(200_000, 50_000)
    b = load_stdlib_corpus(200_000, 50_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert len(a.train) == 200_000 and len(a.val) == 50_000  # capped exactly
    assert a.train.dtype == torch.uint8


def test_train_and_validation_files_are_disjoint_and_from_the_stdlib(no_network):
    c = load_stdlib_corpus(300_000, 100_000)
    assert not set(c.train_files) & set(c.val_files)
    assert all(is_validation(f) for f in c.val_files) and not any(is_validation(f) for f in c.train_files)
    assert not any("site-packages" in f or "dist-packages" in f for f in c.train_files + c.val_files)
    with open(os.path.join(stdlib_root(), c.train_files[0]), "rb") as f:  # the bytes are the first file's
        first = f.read(1000)
    assert bytes(c.train[: len(first)].tolist()) == first


def test_the_order_does_not_depend_on_the_process():
    """SHA-1, not Python's salted hash: another interpreter with another PYTHONHASHSEED lists the same files."""
    code = "from dsd_fx.demo.text_data import stdlib_files; print('\\n'.join(stdlib_files()[:50]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert out == stdlib_files()[:50]


def test_a_larger_cap_extends_the_same_bytes():
    small, large = load_stdlib_corpus(50_000, 20_000), load_stdlib_corpus(100_000, 40_000)
    assert torch.equal(large.train[:50_000], small.train) and torch.equal(large.val[:20_000], small.val)


def test_batches_predict_the_next_byte():
    c = load_stdlib_corpus(20_000, 5_000)
    x, y = TextCorpus.batch(c.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    vx, vy = TextCorpus.windows(c.val, 100)
    assert vx.shape == (49, 100) and torch.equal(vx.flatten()[1:], vy.flatten()[:-1])


@pytest.mark.parametrize("bad", [0, 10, 1.5, True])
def test_bad_caps_are_refused(bad):
    with pytest.raises(ValueError, match="train_bytes must be an int >= 1024"):
        load_stdlib_corpus(bad)

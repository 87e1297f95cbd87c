import copy

import pytest
import torch
import torch.nn.functional as F

import dsd_fx
from conftest import TinyMLP


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _train(model, opt, dsd, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dsd.step()
    dsd.log(loss=loss.item())


def test_three_phases_and_dsdsd():
    model = TinyMLP()
    reference = copy.deepcopy(model)
    dsd = dsd_fx.DSD(model, sgd, lr=0.1, sparsity=0.5)
    m, opt = dsd.begin("dense")
    assert m is model and opt.param_groups[0]["lr"] == 0.1
    _train(m, opt, dsd)
    dense_opt = opt
    m, opt = dsd.begin("sparse")
    assert opt is not dense_opt and not opt.state  # fresh optimizer: no momentum carried over
    masks = {k: v.clone() for k, v in dsd_fx.current_masks(m).items()}
    assert all(int((v == 0).sum()) == round(0.5 * v.numel()) for v in masks.values())
    _train(m, opt, dsd)
    sparse_model = m
    m, opt = dsd.begin("redense")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and not opt.state
    for name, mask in masks.items():  # pruned weights restart from zero
        assert bool((m.get_parameter(name)[~mask] == 0).all())
    dsd.check_optimizer(opt)
    _train(m, opt, dsd)
    assert bool((m.fc1.weight[~masks["fc1.weight"]] != 0).any())  # and train again
    # DSDSD
    m, opt = dsd.begin("sparse")
    _train(m, opt, dsd)
    m, opt = dsd.begin("redense")
    _train(m, opt, dsd)
    assert [r.name for r in dsd.history] == ["dense", "sparse", "redense", "sparse", "redense"]
    assert all(len(r.metrics) == 1 and "loss" in r.metrics[0] for r in dsd.history)
    assert dsd_fx.verify_zero_overhead(reference, m, (torch.randn(2, 8),), latency_runs=2).ok
    del sparse_model


def test_sr_ste_records_sad():
    dsd = dsd_fx.DSD(TinyMLP(), sgd, lr=1.0, pattern="2:4", method="sr-ste", lambda_w=0.0, sad_every=1)
    dsd.begin("dense")
    m, opt = dsd.begin("sparse")
    _train(m, opt, dsd, steps=4)
    sad = dsd.history[-1].sad
    assert [s for s, _ in sad] == [1, 2, 3, 4] and sad[-1][1] > 0


def test_scheduler_is_rebuilt_per_phase():
    dsd = dsd_fx.DSD(TinyMLP(), sgd, lr=0.1, scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    m, opt = dsd.begin("dense")
    _train(m, opt, dsd, steps=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    m, opt = dsd.begin("sparse")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_phases_out_of_order():
    dsd = dsd_fx.DSD(TinyMLP(), sgd, lr=0.1)
    with pytest.raises(ValueError, match="'redense' cannot follow the start"):
        dsd.begin("redense")
    dsd.begin("sparse")
    with pytest.raises(ValueError, match="'sparse' cannot follow sparse.*'redense'"):
        dsd.begin("sparse")
    with pytest.raises(ValueError, match="unknown phase 'final'"):
        dsd.begin("final")


def test_optimizer_of_the_previous_phase_is_refused():
    dsd = dsd_fx.DSD(TinyMLP(), sgd, lr=0.1, pattern="2:4", pack=True)
    _, old = dsd.begin("dense")
    dsd.begin("sparse")  # packing replaces the weights by their packed values
    with pytest.raises(ValueError, match="use the optimizer that begin\\(\\) returned"):
        dsd.check_optimizer(old)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"lr": 0.0}, "lr must be > 0"), ({"lr": 0.1, "redense_lr_scale": 2.0}, "redense_lr_scale")],
)
def test_bad_flow_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        dsd_fx.DSD(TinyMLP(), sgd, **kwargs)


def test_sparse_graph_is_not_a_starting_model():
    with pytest.raises(ValueError, match="already a sparse-phase graph"):
        dsd_fx.DSD(dsd_fx.transform(TinyMLP()), sgd, lr=0.1)


def test_step_before_begin():
    with pytest.raises(ValueError, match="begin"):
        dsd_fx.DSD(TinyMLP(), sgd, lr=0.1).step()

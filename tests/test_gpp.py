"""dsd_fx.GPP: push phases and prune steps around the user's loop, to a budget, then a fine-tune."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(10, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -1.5, 0.7])).argmax(1)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _train(model, opt, data, extra=None):
    total = 0.0
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) + (extra(y) if extra else 0.0)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / len(data)


def test_the_flow_reaches_the_budget_and_records_each_phase():
    torch.manual_seed(0)
    data = _data()
    model = MLP()
    start = dsd_fx.cost(model, (data[0][0],)).params
    gpp = dsd_fx.GPP(model, sgd, lr=0.05, example_args=(data[0][0],), target_params=0.4, step=0.3)
    while not gpp.done:
        net, opt = gpp.begin("push")
        gpp.log(loss=_train(net, opt, data, gpp.push_loss))
        gpp.prune(data=data)  # the default importance, "discriminant", reads (inputs, labels) batches
    net, opt = gpp.begin("finetune")
    gpp.log(loss=_train(net, opt, data))
    final = dsd_fx.cost(net, (data[0][0],)).params
    assert 0.35 * start < final <= 0.4 * start  # the last step lands at the budget, not far below it
    assert "tap" not in net.code  # the fine-tuned model has no taps
    phases = [r.name for r in gpp.history]
    assert phases[-1] == "finetune" and set(phases[:-1]) == {"push"} and len(phases) >= 3
    params = [r.params for r in gpp.history]
    assert params == sorted(params, reverse=True) and params[0] == start
    assert all(len(r.steps) == 1 for r in gpp.history[:-1])
    assert all(r.metrics and torch.isfinite(torch.tensor(r.metrics[-1]["loss"])) for r in gpp.history)


def test_a_push_phase_trains_through_the_tap():
    data = _data()
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(data[0][0],), target_params=0.5)
    net, opt = gpp.begin("push")
    before = net.get_parameter("fc2.weight").detach().clone()
    net(data[0][0])
    gpp.push_loss(data[0][1]).backward()
    assert net.get_parameter("fc2.weight").grad.abs().sum() > 0  # the push loss reaches the layers below the tap
    opt.step()
    assert not torch.equal(net.get_parameter("fc2.weight").detach(), before)


@pytest.mark.parametrize("calls, words", [
    (["finetune"], "budget is not met"),
    (["push", "push"], "followed by a prune step"),
    (["prune"], "follows a push phase"),
    (["grow_"], "unknown phase 'grow_'"),
    (["push", "grow"], "grow phases come first, before the first push"),
])
def test_phases_out_of_order_are_refused(calls, words):
    data = _data()
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(data[0][0],), target_params=0.5)
    with pytest.raises(ValueError, match=words):
        for c in calls:
            gpp.prune() if c == "prune" else gpp.begin(c, **({"at": ["fc1"], "width": 4} if c == "grow" else {}))


@pytest.mark.parametrize("phase, options, words", [
    ("push", {"at": ["fc1"]}, r"only begin\('grow', ...\) takes options, got at for 'push'"),
    ("grow", {"at": ["fc1"], "example_args": (torch.randn(2, 10),)}, "example_args are GPP's own"),
    ("grow", {"at": ["fc1"], "colour": 1}, "unknown option"),
])
def test_grow_options_are_checked(phase, options, words):
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(torch.randn(2, 10),), target_params=0.5)
    with pytest.raises(TypeError, match=words):
        gpp.begin(phase, **options)
    assert gpp.phase is None and not gpp.history


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16 * 8, 3)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(h.flatten(1))


def test_grow_first_then_push_and_prune_to_the_budget_of_the_model_given():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(192, 1, 16, generator=g)
    y = (x[:, 0, :5].sum(1) > 0).long() + (x[:, 0, -5:].sum(1) > 0).long()
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 192, 64)]
    model = Conv1dNet()
    start = dsd_fx.cost(model, (x[:4],)).params
    with torch.no_grad():
        want = model.eval()(x[:4])
    gpp = dsd_fx.GPP(model, sgd, lr=0.05, example_args=(x[:4],), target_params=0.5, step=0.5)
    net, opt = gpp.begin("grow", at=["conv1", "conv2"], width=8, how="inception")
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x[:4]), want)  # function-preserving at insertion
    gpp.log(loss=_train(net.train(), opt, data))
    grown = gpp.history[0].params
    assert gpp.history[0].name == "grow" and grown > start and not gpp.done
    while not gpp.done:
        net, opt = gpp.begin("push")
        gpp.log(loss=_train(net, opt, data, gpp.push_loss))
        gpp.prune(data=data)
    net, opt = gpp.begin("finetune")
    gpp.log(loss=_train(net, opt, data))
    assert dsd_fx.cost(net, (x[:4],)).params <= 0.5 * start  # the budget is of the model given, not the grown one
    assert [r.name for r in gpp.history][:2] == ["grow", "push"] and "conv1_inception" in net.code


@pytest.mark.parametrize("options, words", [
    ({}, "exactly one budget"),
    ({"target_params": 0.5, "target_macs": 0.5}, "exactly one budget"),
    ({"target_params": 1.5}, "target_params must be a fraction"),
    ({"target_params": 0.5, "step": 0.0}, "step must be a fraction"),
])
def test_bad_budgets_are_refused_before_training(options, words):
    with pytest.raises(ValueError, match=words):
        dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(torch.randn(2, 10),), **options)


def test_a_budget_that_cannot_be_met_says_so():
    """One Linear: its input and output channels are never pruned, so no prune step can help."""
    model = nn.Sequential(nn.Linear(10, 3))
    gpp = dsd_fx.GPP(model, sgd, lr=0.05, example_args=(torch.randn(4, 10),), target_params=0.5)
    gpp.begin("push")
    with pytest.raises(ValueError, match="no channel group"):
        gpp.prune(data=[(torch.randn(4, 10), torch.tensor([0, 1, 2, 0]))])


def test_the_landing_step_ranks_as_the_discriminant_prune_phase_and_reads_a_generator_once():
    torch.manual_seed(0)
    data = _data()
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(data[0][0],), target_params=0.6, step=0.9,
                     importance="discriminant")
    net, opt = gpp.begin("push")
    _train(net, opt, data, gpp.push_loss)
    plain = dsd_fx.transform(net, phase="dense")  # what the prune step starts from
    pruned = gpp.prune(data=(batch for batch in data))  # a one-pass generator
    (step,) = gpp.history[-1].steps
    assert step.fraction < 0.9 and gpp.done  # the full step overshot: the landing fraction is smaller
    want = dsd_fx.transform(plain, phase="prune", channels=step.fraction, importance="discriminant", data=data,
                            example_args=(data[0][0],))
    got, ref = pruned.state_dict(), want.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_macs_budget_lands_at_the_budget():
    data = _data()
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(data[0][0],), target_macs=0.3, step=0.5, importance="l1")
    start = gpp.start.macs
    while not gpp.done:
        net, opt = gpp.begin("push")
        _train(net, opt, data, gpp.push_loss)
        gpp.prune()
    assert 0.25 * start < gpp.now.macs <= 0.3 * start


def test_the_default_discriminant_prune_step_asks_for_data_before_any_change():
    data = _data()
    gpp = dsd_fx.GPP(MLP(), sgd, lr=0.05, example_args=(data[0][0],), target_params=0.5)
    net, _ = gpp.begin("push")
    with pytest.raises(TypeError, match=r"importance='discriminant' \(GPP's default.*needs data=.*importance='l1'"):
        gpp.prune()
    assert gpp.phase == "push" and gpp.model is net and not gpp.history[-1].steps

"""2:4 sparsity trained with SR-STE, with SAD logged, through the DSD helper; then the proof.

    python examples/nm_sr_ste.py
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
reference = copy.deepcopy(model)
x = torch.randn(1024, 32)
y = (x[:, :4] - x[:, 4:8]).argmax(1)

dsd = dsd_fx.DSD(model, lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), lr=0.05,
                 pattern="2:4", method="sr-ste", sad_every=20)
for phase in ("sparse", "redense"):  # N:M from scratch, then an optional dense fine-tune
    net, opt = dsd.begin(phase)
    for epoch in range(5):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[i : i + 64]), y[i : i + 64])
            loss.backward()
            opt.step()
            dsd.step()
        acc = (net(x).argmax(1) == y).float().mean().item()
        dsd.log(loss=loss.item(), accuracy=acc)
    last = dsd.history[-1]
    sad = f", SAD since start {last.sad[-1][1]:.2%} at step {last.sad[-1][0]}" if last.sad else ""
    print(f"{phase:8s} loss {last.metrics[-1]['loss']:.4f} accuracy {last.metrics[-1]['accuracy']:.3f}{sad}")

report = dsd_fx.verify_zero_overhead(reference, dsd.model, (x[:1],))
print(report.table)
assert report.ok

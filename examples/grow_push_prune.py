"""Grow-Push-Prune on your own CNN, in your own loop: grow an Inception module, push, prune to a
budget, fine-tune, then a pruned ONNX file proven to be the same graph with smaller shapes.

    python examples/grow_push_prune.py
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx


class Net(nn.Module):  # your model: nothing dsd_fx-specific in it
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 16, 3)

    def forward(self, x):  # (B, 1, 32)
        h = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(h.flatten(1))


def epoch(model, opt, batches, extra=None):
    model.train()
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + (extra(y) if extra else 0.0)
        loss.backward()
        opt.step()


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


torch.manual_seed(0)
x = torch.randn(768, 1, 32)
y = (x[:, 0, :8].mean(1) > 0).long() + (x[:, 0, -8:].mean(1) > 0).long()  # 3 classes from two windows
batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
test = (x[512:], y[512:])
example = (x[:1],)

model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(10):
    epoch(model, opt, batches)
print(f"dense        acc {accuracy(model, *test):.3f}  params {dsd_fx.cost(model, example).params:,}")

gpp = dsd_fx.GPP(model, lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9), lr=0.05, example_args=example,
                 target_params=0.5, step=0.3, finetune_lr_scale=0.1)
grown, opt = gpp.begin("grow", at=["conv2"], width=8, how="inception")  # conv2 becomes one branch of four more
print(f"grown        acc {accuracy(grown, *test):.3f}  params {gpp.now.params:,}  (the same function at insertion)")
for _ in range(5):
    epoch(grown, opt, batches)
reference = copy.deepcopy(grown)  # the grown architecture the prune steps start from, for the proof
while not gpp.done:
    pushed, opt = gpp.begin("push")  # the tapped model: gpp.push_loss reads the tap
    for _ in range(5):
        epoch(pushed, opt, batches, gpp.push_loss)
    pruned = gpp.prune(data=batches)  # channels ranked by their discriminant importance
    print(f"push+prune   acc {accuracy(pruned, *test):.3f}  params {gpp.now.params:,}")
final, opt = gpp.begin("finetune")
for _ in range(10):
    epoch(final, opt, batches)
print(f"fine-tuned   acc {accuracy(final, *test):.3f}  params {gpp.now.params:,} "
      f"({gpp.now.params / gpp.start.params:.0%} of the dense model)")

report = dsd_fx.verify_pruned(reference, final, example)  # same ONNX ops, smaller shapes, onnxruntime = torch
print(report.table)
assert report.ok and gpp.now.params <= 0.5 * gpp.start.params

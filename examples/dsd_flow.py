"""Dense -> Sparse -> re-Dense on your own model, in your own loop, then a proven ONNX file.

    python examples/dsd_flow.py
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx


class Net(nn.Module):  # your model: nothing dsd_fx-specific in it
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def train(model, lr, steps, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)  # a fresh optimizer per phase
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return F.cross_entropy(model(x), y).item()


torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
model = Net()
reference = copy.deepcopy(model)  # the untouched architecture, for the proof

print("dense    loss", round(train(model, 0.05, 100, x, y), 4))
sparse = dsd_fx.transform(model, phase="sparse", sparsity=0.5)  # masks are visible nodes: print(sparse.code)
print("sparse   loss", round(train(sparse, 0.05, 100, x, y), 4))
dense = dsd_fx.transform(sparse, phase="dense")  # pruned weights restart from zero
print("re-dense loss", round(train(dense, 0.005, 100, x, y), 4))  # DSD: a tenth of the learning rate

model.load_state_dict(dense.state_dict())  # back into your own class, same keys
dsd_fx.export_onnx(dense, (x[:1],), "dsd_flow.onnx")
report = dsd_fx.verify_zero_overhead(reference, dense, (x[:1],))
print(report.table)
assert report.ok

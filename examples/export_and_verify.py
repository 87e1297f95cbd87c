"""Export a trained DSD model to ONNX and prove, node by node, that no trace of the sparsity is left.

    python examples/export_and_verify.py

Three files, and three ways to check them: the Python API, the `dsd-fx check` command, and
onnxruntime run on the shipped file against torch.
"""
import copy
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

import dsd_fx

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
reference = copy.deepcopy(model)  # the never-sparsified architecture
example = (torch.randn(1, 3, 16, 16),)

sparse = dsd_fx.transform(model, phase="sparse", pattern="2:4")  # (train it here)
dsd_fx.export_onnx(sparse, example, "sparse_folded.onnx")  # any phase exports; masks are folded into the weights
dense = dsd_fx.transform(sparse, phase="dense")  # (and retrain it here)

# 1. the files: the shipped model and a never-sparsified model of the same architecture
dsd_fx.export_onnx(dense, example, "model.onnx")
dsd_fx.export_onnx(reference, example, "reference.onnx")

# 2. the proof from Python: same ONNX graph node by node, same initializers, onnxruntime == torch
report = dsd_fx.verify_zero_overhead(reference, dense, example)
print(report.table)

# 3. the same check on the files, as CI would run it
check = subprocess.run([sys.executable, "-m", "dsd_fx", "check", "reference.onnx", "model.onnx"], capture_output=True, text=True)
print(check.stdout.strip().splitlines()[-1], "(dsd-fx check reference.onnx model.onnx)")

# 4. the shipped file in onnxruntime, against torch
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
(ort_out,) = session.run(None, {session.get_inputs()[0].name: example[0].numpy()})
with torch.no_grad():
    torch_out = dense.eval()(*example).numpy()
print("onnxruntime vs torch max |diff|:", float(np.abs(ort_out - torch_out).max()))
assert report.ok and check.returncode == 0 and np.allclose(ort_out, torch_out, atol=1e-5)

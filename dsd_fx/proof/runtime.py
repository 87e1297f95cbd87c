"""Run exported graphs with onnxruntime: sessions, feeds, the largest difference from torch, latency."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch.utils._pytree import tree_flatten, tree_map

from dsd_fx.infra.calls import eval_mode
from dsd_fx.proof.export import export_onnx

__all__ = ["Runtime", "session", "feeds", "sessions_for", "max_abs_diff", "latency_ms", "tolerance", "TOLERANCES"]

# The parity rows' default (rtol, atol) by the floating dtype onnxruntime ran, rtol about ten machine
# epsilons of it (atol a tenth of rtol): the exports round every intermediate to that dtype where
# torch's CPU kernels may not, so the same model differs by about one epsilon of its output scale in
# fp16 (measured: 5e-4 to 9e-4 relative) and float32's 1e-4 refused correct fp16 models.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (8e-2, 8e-3)}
# onnxruntime's names of the dtypes its type errors cite ("Type 'tensor(bfloat16)' ... is invalid")
_ORT_NAMES = {"float16": "float16", "bfloat16": "bfloat16", "float64": "double"}


def session(proto: onnx.ModelProto):
    """An onnxruntime CPU session for `proto`, one thread, quiet."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def feeds(sess, args: Sequence[Any]) -> dict[str, np.ndarray]:
    """The session's inputs, by name, from the tensors of `args` in order."""
    flat = [a for a in tree_flatten(list(args))[0] if isinstance(a, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(flat):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs but the example args hold {len(flat)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}


def _low_precision(model: torch.nn.Module, args: tuple) -> list[str]:
    """The floating dtypes other than float32 that `model` and `args` hold."""
    tensors = [*model.state_dict().values(), *tree_flatten(list(args))[0]]
    found = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return sorted(str(d).removeprefix("torch.") for d in found - {torch.float32})


def _float32(value: Any) -> Any:
    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


@dataclass
class Runtime:
    """The reference and final sessions of a proof, and the torch model and inputs they are checked against.

    `float32_copy` says why the sessions run float32 copies of both models instead of the exports
    (empty where they run the exports themselves).
    """

    reference: Any
    final: Any
    model: torch.nn.Module
    args: tuple
    float32_copy: str = ""


def sessions_for(reference: torch.nn.Module, final: torch.nn.Module, args: tuple,
                 ref_proto: onnx.ModelProto, fin_proto: onnx.ModelProto, optimize: bool) -> Runtime:
    """Sessions for the two exports; where onnxruntime's CPU provider has no kernel for their dtype
    (bfloat16 Gemm: NOT_IMPLEMENTED; bfloat16 Conv: INVALID_GRAPH, a type error naming the dtype),
    sessions for float32 copies of both models, exported the same way."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph as OrtInvalidGraph
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    try:
        return Runtime(session(ref_proto), session(fin_proto), final, args)
    except (OrtNotImplemented, OrtInvalidGraph) as err:
        dtypes = _low_precision(final, args)
        # an invalid graph for another reason than its dtype is a real failure: raised as it is
        by_dtype = isinstance(err, OrtNotImplemented) or any(f"tensor({_ORT_NAMES.get(d, d)})" in str(err) for d in dtypes)
        if not dtypes or not by_dtype:
            raise
        why = f"{'/'.join(dtypes)}: {str(err).split(' : ')[-1].strip()}"
    ref32, fin32, args32 = copy.deepcopy(reference).float(), copy.deepcopy(final).float(), _float32(args)
    sessions = [session(export_onnx(m, args32, optimize=optimize, fold=False)) for m in (ref32, fin32)]
    return Runtime(*sessions, fin32, args32, why)


def tolerance(model: torch.nn.Module, args: tuple, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """(rtol, atol): the caller's where given, else TOLERANCES' for the least precise floating dtype
    that the parity run's `model` and `args` hold (float32 copies: float32's; float64 or none too)."""
    tensors = [*model.state_dict().values(), *tree_flatten(list(args))[0]]
    found = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    default = max((TOLERANCES.get(d, TOLERANCES[torch.float32]) for d in found), default=TOLERANCES[torch.float32])
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def max_abs_diff(rt: Runtime) -> tuple[float, float, str | None]:
    """(largest |torch - onnxruntime| over the final model's outputs, largest |torch output|, a
    message where the two give different numbers of outputs)."""
    ort_out = rt.final.run(None, feeds(rt.final, rt.args))
    with eval_mode(rt.model), torch.no_grad():
        torch_out = [t for t in tree_flatten(rt.model(*rt.args))[0] if isinstance(t, torch.Tensor)]
    max_diff, scale, mismatch = 0.0, 0.0, None
    if len(torch_out) != len(ort_out):
        mismatch = f"onnxruntime gave {len(ort_out)} outputs, torch {len(torch_out)}"
        max_diff = float("inf")
    for t, o in zip(torch_out, ort_out):
        t = t.detach().float().cpu().numpy()
        max_diff = max(max_diff, float(np.max(np.abs(t - o.astype(np.float32)))) if t.size else 0.0)
        scale = max(scale, float(np.max(np.abs(t))) if t.size else 0.0)
    return max_diff, scale, mismatch


def latency_ms(rt: Runtime, runs: int) -> tuple[float, float]:
    """Median milliseconds per run of the reference and the final session, measured interleaved."""
    inputs = (feeds(rt.reference, rt.args), feeds(rt.final, rt.args))
    sessions = (rt.reference, rt.final)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(2):  # warm-up
        for s, f in zip(sessions, inputs):
            s.run(None, f)
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, inputs)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3

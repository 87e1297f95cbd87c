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

__all__ = ["Runtime", "session", "feeds", "sessions_for", "max_abs_diff", "latency_ms"]


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
    (bfloat16 Gemm, for one), sessions for float32 copies of both models, exported the same way."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    try:
        return Runtime(session(ref_proto), session(fin_proto), final, args)
    except OrtNotImplemented as err:
        dtypes = _low_precision(final, args)
        if not dtypes:
            raise
        why = f"{'/'.join(dtypes)}: {str(err).split(' : ')[-1].strip()}"
    ref32, fin32, args32 = copy.deepcopy(reference).float(), copy.deepcopy(final).float(), _float32(args)
    sessions = [session(export_onnx(m, args32, optimize=optimize, fold=False)) for m in (ref32, fin32)]
    return Runtime(*sessions, fin32, args32, why)


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

"""Third-party models: transformers 5 through capture="export", and GraphModules from other tracers.

transformers removed its fx tracer in 5.0; its models come in through torch.export. Model code
from transformers is an optional group: skipped when transformers is not installed (the test
extra installs it). Every model is built from a tiny config (random weights, no download).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import dsd_fx
from tests.conftest import prove_once

VOCAB = 128
METHODS = {
    "unstructured": dict(sparsity=0.5),
    "2:4 fixed": dict(pattern="2:4"),
    "sr-ste": dict(pattern="2:4", method="sr-ste"),
    "packed": dict(pattern="2:4", pack=True),
}


def _hf_models():
    tr = pytest.importorskip("transformers", minversion="5")
    # one layer: what a layer holds is what the tests look at; the ONNX proof's time grows with depth
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=64)
    return {
        # grouped KV heads: 4 query heads read 2 KV heads
        "llama": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**small, num_key_value_heads=2, use_cache=False, attn_implementation="sdpa")),
        "qwen2": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**small, num_key_value_heads=2, use_cache=False, attn_implementation="eager")),
        # Conv1D: (in, out) weights through addmm; lm_head tied to wte
        "gpt2": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                         use_cache=False, attn_implementation="sdpa", bos_token_id=0,
                                                         eos_token_id=0)),
        "bert": lambda: tr.BertModel(tr.BertConfig(**small, attn_implementation="eager")),
    }


def _out(y) -> torch.Tensor:
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert"])
def test_transformers5_every_sparse_method_trains_redenses_into_the_hf_class_and_proves(name):
    make = _hf_models()[name]
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 8))
    model = make()
    # one capture, taken by every method (an ExportedProgram, copied by transform: each method starts from these weights)
    program = torch.export.export(model, (ids,), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    proven = None  # the code of the first re-densed graph, proven against the HF model's own ONNX export
    for method, options in METHODS.items():
        sparse = dsd_fx.transform(program, copy=True, **options)
        masks = dsd_fx.current_masks(sparse)
        assert len(masks) >= 5, method  # every attention and MLP projection
        opt = torch.optim.AdamW(sparse.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(2):
            batch = torch.randint(0, VOCAB, (3, 11))  # another batch size and length than captured
            loss = _out(sparse(batch)).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if method in ("unstructured", "2:4 fixed"):
            for w, mask in masks.items():
                assert not (sparse.get_parameter(w).detach() * (~mask.bool())).any(), (method, w)
        dense = dsd_fx.transform(sparse, phase="dense")
        hf = copy.deepcopy(model)  # the HF class, as make() builds it (a copy: building one takes seconds)
        hf.load_state_dict(dense.state_dict())  # strict: exactly the HF class's keys
        dense.eval(), hf.eval()
        torch.testing.assert_close(_out(dense(ids)), _out(hf(ids)))
        proven = prove_once(proven, hf, dense, (ids,), method)


def test_gpt2_tied_embedding_is_one_mask_and_conv1d_nm_runs_along_its_input_dim():
    make = _hf_models()["gpt2"]
    ids = torch.randint(0, VOCAB, (2, 8))
    sparse = dsd_fx.transform(make(), capture="export", example_args=(ids,), sparsity=0.5)
    names = [n for n, _ in sparse.named_buffers() if n.endswith("_mask")]
    assert "transformer.wte.weight_mask" in names and not any(n.startswith("lm_head") for n in names)
    nm = dsd_fx.transform(make(), capture="export", example_args=(ids,), pattern="2:4")
    keep = dsd_fx.current_masks(nm)["transformer.h.0.attn.c_attn.weight"]  # 32 x 96, (in, out) through addmm
    assert (keep.T.reshape(96, -1, 4).sum(-1) == 2).all()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.lm_head.weight is dense.transformer.wte.weight


def test_transformers5_models_fail_fx_and_the_error_names_export():
    make = _hf_models()["llama"]
    with pytest.raises(TypeError, match=r'capture="export", example_args='):
        dsd_fx.transform(make(), capture="fx")


# ---------------------------------------------------------------- GraphModules from other tracers


class _Gate(nn.Module):
    """A layer that builds a tensor from its input's shape: fx cannot trace into it, a custom tracer keeps it a leaf."""

    def forward(self, x):
        return x * torch.tril(torch.ones(x.shape[-1], x.shape[-1])).mean(0)


class _GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(8, 16), _Gate(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.gate(F.relu(self.fc1(x))))


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _Gate) or super().is_leaf_module(m, qualname)


def test_graph_module_from_a_custom_tracer():
    torch.manual_seed(0)
    model, x = _GatedMLP(), torch.randn(2, 8)
    reference = copy.deepcopy(model)
    with pytest.raises(TypeError, match="torch.fx could not trace"):
        dsd_fx.transform(model, capture="fx")
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    sparse = dsd_fx.transform(gm, sparsity=0.5)
    assert sparse.fc1.weight is model.fc1.weight
    sparse(x).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.code == gm.code and list(dense.state_dict()) == list(reference.state_dict())
    assert dsd_fx.verify_zero_overhead(reference, dense, (x,), latency_runs=2).ok


def test_meta_tracer_graph():
    from torch.fx.experimental.meta_tracer import symbolic_trace as meta_trace

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    gm = meta_trace(model, meta_args={"input": torch.empty(2, 8, device="meta")})
    sparse = dsd_fx.transform(gm, sparsity=0.5)
    sparse(torch.randn(2, 8)).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dsd_fx.verify_zero_overhead(reference, dense, (torch.randn(2, 8),), latency_runs=2).ok

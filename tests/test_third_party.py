"""Graphs from other tracers: transformers' fx tracer (BERT, GPT-2, T5) and torch's MetaTracer.

Third-party model code is an optional group: skipped when transformers is not installed
(the test extra installs transformers<4.48, the last line with transformers.utils.fx).
"""
import copy

import pytest
import torch
import torch.nn as nn

import dsd_fx


def _hf_models():
    tr = pytest.importorskip("transformers")
    pytest.importorskip("transformers.utils.fx")
    return {
        "bert": (lambda: tr.BertForSequenceClassification(tr.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)), ["input_ids", "attention_mask"]),
        "gpt2": (lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
                 ["input_ids", "attention_mask"]),
        "t5": (lambda: tr.T5ForConditionalGeneration(tr.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
            ["input_ids", "attention_mask", "decoder_input_ids"]),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_transformers_fx_graph_sparse_step_dense_verified(name):
    from transformers.utils.fx import symbolic_trace as hf_trace

    make, inputs = _hf_models()[name]
    torch.manual_seed(0)
    model = make().eval()
    gm = hf_trace(model, input_names=inputs)
    original_code, keys = gm.code, list(gm.state_dict())
    reference = copy.deepcopy(gm)
    ids = torch.randint(0, 100, (2, 8))
    feeds = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long), "decoder_input_ids": ids[:, :4]}
    args = tuple(feeds[k] for k in inputs)

    sparse = dsd_fx.transform(gm, sparsity=0.5)
    masks = {n[:-5]: b for n, b in sparse.named_buffers() if n.endswith("_mask")}
    assert len(masks) >= 8
    for w, mask in masks.items():
        assert float((sparse.get_parameter(w) == 0).float().mean()) >= 0.5 - 1e-6, w
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    sparse.train()(*args)["logits"].float().pow(2).mean().backward()
    opt.step()  # one training step: pruned weights stay zero
    for w, mask in masks.items():
        assert not (sparse.get_parameter(w).detach() * (1 - mask)).any(), w
    dense = dsd_fx.transform(sparse, phase="dense").eval()
    assert dense.code == original_code and list(dense.state_dict()) == keys
    report = dsd_fx.verify_zero_overhead(reference, dense, args, latency_runs=2)
    assert report.ok, report.table


def test_gpt2_tied_embedding_is_one_mask_and_one_tensor():
    from transformers.utils.fx import symbolic_trace as hf_trace

    make, inputs = _hf_models()["gpt2"]
    model = make()
    gm = hf_trace(model, input_names=inputs)
    sparse = dsd_fx.transform(gm, sparsity=0.5)
    names = [n for n, _ in sparse.named_buffers() if n.endswith("_mask")]
    assert "transformer.wte.weight_mask" in names and not any(n.startswith("lm_head") for n in names)
    # GPT-2's Conv1D keeps (in, out) weights used through addmm: N:M must run along dim 0 there
    nm = dsd_fx.transform(hf_trace(make(), input_names=inputs), pattern="2:4")
    keep = dsd_fx.current_masks(nm)["transformer.h.0.attn.c_attn.weight"]  # 32 x 96, (in, out)
    assert (keep.T.reshape(96, -1, 4).sum(-1) == 2).all()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dense.lm_head.weight is dense.transformer.wte.weight


def test_meta_tracer_graph():
    from torch.fx.experimental.meta_tracer import symbolic_trace as meta_trace

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    gm = meta_trace(model, meta_args={"input": torch.empty(2, 8, device="meta")})
    sparse = dsd_fx.transform(gm, sparsity=0.5)
    sparse(torch.randn(2, 8)).sum().backward()
    dense = dsd_fx.transform(sparse, phase="dense")
    assert dsd_fx.verify_zero_overhead(reference, dense, (torch.randn(2, 8),), latency_runs=2).ok

"""Heads, grouped KV heads, SwiGLU and the hidden dim on torch.export graphs (aten ops), and transformers 5 models written back."""
from __future__ import annotations

import copy

import pytest
import torch

from dsd_fx.infra.graph_capture import capture
from dsd_fx.channels import groups_of, propagate_shapes
from dsd_fx.phases import transform
from tests.channel_models import Attention, TinyGPT
from tests.test_heads import kill_heads, slots

X = torch.randn(2, 5, 32)


def exported_groups(model, args, hidden=False):
    gm = capture(model, how="export", example_args=args)
    propagate_shapes(gm, args)
    return {g.name: g for g in groups_of(gm, hidden)}


@pytest.mark.parametrize("how", ["sdpa", "softmax", "gqa", "interleave"])
def test_aten_heads_grouped_like_the_fx_graph(how):
    g = exported_groups(Attention(32, 4, kv=2, how=how), (X,))
    unit = g["q_proj"]
    assert unit.prunable and unit.size == 2 and unit.width == 16 and unit.producers == ("q_proj", "k_proj", "v_proj")
    assert {s for s in slots(unit) if not s[1].startswith("#")} == (
        {("q_proj", t, 0, 0, 16) for t in ("weight", "bias")} | {(f"{p}_proj", t, 0, 0, 8) for p in "kv" for t in ("weight", "bias")}
        | {("o_proj", "weight", 1, 0, 16)})
    assert ("view", "#1.2", 0, 0, 2) in slots(unit)  # aten.view(x, [s0, s1, 4, 8]): the 4 is rewritten


@pytest.mark.parametrize("how", ["sdpa", "gqa", "interleave"])
def test_aten_dead_kv_heads_removed_with_the_same_output_at_other_sizes(how):
    model = kill_heads(Attention(32, 4, kv=2, how=how), [2, 3], [1]).eval()
    gm = transform(model, phase="prune", channels=0.5, example_args=(X,), capture="export").eval()
    assert gm.q_proj.weight.shape == (16, 32) and gm.k_proj.weight.shape == (8, 32) and gm.o_proj.weight.shape == (32, 16)
    for shape in ((2, 5, 32), (3, 9, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_aten_hidden_with_a_tied_lm_head_read_under_one_name():
    ids = torch.randint(0, 50, (2, 7))
    model = TinyGPT().eval()
    gm = transform(model, phase="prune", channels=0.25, hidden=True, example_args=(ids,), capture="export").eval()
    assert gm.lm_head.weight.shape == (50, 24) and gm.tok.weight is gm.lm_head.weight and gm.ln1.weight.shape == (24,)
    assert gm(torch.randint(0, 50, (3, 11))).shape == (3, 11, 50)


tr = pytest.importorskip("transformers")


def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, use_cache=False, **extra)
    return cls(config).eval()


IDS = torch.randint(0, 128, (2, 9))
LMS = [("llama", "LlamaForCausalLM", "LlamaConfig"), ("qwen2", "Qwen2ForCausalLM", "Qwen2Config")]


def test_llama_groups_kv_heads_and_swiglu_channels():
    g = exported_groups(_tiny(tr.LlamaForCausalLM, tr.LlamaConfig), (IDS,))
    attn, mlp = g["model.layers.0.self_attn.q_proj"], g["model.layers.0.mlp.gate_proj"]
    assert attn.prunable and attn.size == 2 and attn.width == 32  # 2 KV heads, each with 2 query heads of 16
    assert attn.producers == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert mlp.prunable and mlp.size == 96
    assert slots(mlp) == {(f"model.layers.0.mlp.{p}", "weight", d, 0, 1) for p, d in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))}
    assert not g["model.embed_tokens"].prunable  # the residual stream: RMSNorm's statistics, unless hidden=True


def test_llama_dead_kv_group_removed_with_the_same_logits_at_other_sizes():
    model = _tiny(tr.LlamaForCausalLM, tr.LlamaConfig)
    a = model.model.layers[0].self_attn
    with torch.no_grad():  # KV head 1 and its query heads 2, 3
        a.k_proj.weight[16:32] = 0.0
        a.v_proj.weight[16:32] = 0.0
        a.q_proj.weight[32:64] = 0.0
        a.o_proj.weight[:, 32:64] = 0.0
    gm = transform(model, phase="prune", channels={"model.layers.0.self_attn.q_proj": 0.5}, example_args=(IDS,), capture="export").eval()
    assert gm.get_submodule("model.layers.0.self_attn.q_proj").weight.shape == (32, 64)
    assert gm.get_submodule("model.layers.0.self_attn.k_proj").weight.shape == (16, 64)
    for shape in ((2, 9), (3, 17)):
        ids = torch.randint(0, 128, shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, model_cls, config_cls", LMS, ids=[n for n, *_ in LMS])
def test_inplace_writes_the_config_and_the_model_saves_and_reloads(name, model_cls, config_cls, tmp_path):
    model = _tiny(getattr(tr, model_cls), getattr(tr, config_cls))
    gm = transform(model, phase="prune", channels=0.5, example_args=(IDS,), capture="export", inplace=True).eval()
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.hidden_size) == (2, 1, 16, 48, 64)
    assert model.model.layers[1].mlp.intermediate_size == 48
    assert model.model.layers[1].self_attn.q_proj.weight is gm.get_submodule("model.layers.1.self_attn.q_proj").weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, gm(IDS).logits)
        model.save_pretrained(tmp_path)
        again = getattr(tr, model_cls).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits)
        assert again.generate(IDS, max_new_tokens=3, do_sample=False).shape == (2, 12)


def test_inplace_refuses_what_the_config_cannot_say_before_anything_changes():
    model = _tiny(tr.LlamaForCausalLM, tr.LlamaConfig)
    before, config = copy.deepcopy(model.state_dict()), model.config.to_dict()
    with pytest.raises(ValueError, match=r"different num_attention_heads \(model.layers.0.self_attn: 2, model.layers.1.self_attn: 4"):
        transform(model, phase="prune", channels={"model.layers.0.self_attn.q_proj": 0.5}, example_args=(IDS,),
                  capture="export", inplace=True)
    assert model.config.to_dict() == config and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bert = tr.BertForSequenceClassification(tr.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, max_position_embeddings=64, num_labels=3)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(ValueError, match=r"BertConfig cannot describe the pruned model: 'bert.encoder.layer.0.attention.self.query.weight' "
                                         r"would be \(16, 32\), but the config .* builds \(32, 32\)"):
        transform(bert, phase="prune", channels=0.5, example_args=(ids,), capture="export", inplace=True)
    assert bert.config.intermediate_size == 64 and bert.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    transform(bert, phase="prune", channels=0.5, example_args=(ids,), capture="export", inplace=True,
              exclude=["*attention*", "bert.pooler.dense"])  # the MLP's channels: BertConfig says intermediate_size
    assert bert.config.intermediate_size == 32 and bert(ids).logits.shape == (2, 3)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_hidden_inplace_writes_hidden_size_and_keeps_the_tie(tied, tmp_path):
    torch.manual_seed(0)
    config = tr.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False)
    model = tr.LlamaForCausalLM(config).eval()
    gm = transform(model, phase="prune", channels=0.25, hidden=True, example_args=(IDS,), capture="export", inplace=True).eval()
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (48, 4, 2, 16, 72)
    assert model.model.norm.weight.shape == (48,) and model.lm_head.weight.shape == (128, 48)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, gm(IDS).logits)
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(tr.LlamaForCausalLM.from_pretrained(tmp_path).eval()(IDS).logits, model(IDS).logits)


def test_vit_heads_and_hidden_through_the_patch_conv_class_token_and_position_embeddings():
    model = tr.ViTForImageClassification(tr.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    img = torch.randn(2, 3, 32, 32)
    g = exported_groups(model, (img,))
    heads = g["vit.layers.0.attention.q_proj"]
    assert heads.prunable and heads.size == 4 and heads.width == 8
    assert not g["vit.embeddings.patch_embeddings.projection"].prunable
    stream = exported_groups(model, (img,), hidden=True)["vit.embeddings.patch_embeddings.projection"]
    assert stream.prunable and {("vit.embeddings", "cls_token", 2, 0, 1), ("vit.embeddings", "position_embeddings", 2, 0, 1),
                                ("classifier", "weight", 1, 0, 1)} <= slots(stream)
    gm = transform(model, phase="prune", channels=0.25, hidden=True, example_args=(img,), capture="export").eval()
    assert gm.get_submodule("vit.embeddings").cls_token.shape == (1, 1, 24)
    assert gm.get_submodule("vit.layers.0.attention.q_proj").weight.shape == (24, 24)
    with torch.no_grad():
        assert gm(torch.randn(3, 3, 32, 32)).logits.shape == (3, 3)


def test_gpt2_fused_c_attn_heads_and_conv1d_mlp():
    model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)).eval()
    ids = torch.randint(0, 100, (2, 8))
    g = exported_groups(model, (ids,))
    heads = g["transformer.h.0.attn.c_attn"]
    assert heads.prunable and heads.size == 4 and heads.width == 8
    assert {("transformer.h.0.attn.c_attn", "weight", 1, k * 4, 8) for k in range(3)} <= slots(heads)  # Conv1D: (in, out)
    assert g["transformer.h.0.mlp.c_fc"].prunable and g["transformer.h.0.mlp.c_fc"].size == 128
    gm = transform(model, phase="prune", channels=0.5, example_args=(ids,), capture="export").eval()
    assert gm.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (32, 48)
    with torch.no_grad():
        assert gm(torch.randint(0, 100, (3, 11))).logits.shape == (3, 11, 100)

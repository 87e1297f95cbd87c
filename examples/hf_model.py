"""A transformers 5 Llama through capture="export": 2:4 SR-STE steps -> re-dense -> back into the HF class -> proof.

    pip install "transformers>=5,<6"
    python examples/hf_model.py

The model is a small Llama (grouped KV heads) built from a config: random weights, no download.
transformers 5 has no fx tracer and torch.fx cannot trace its models; torch.export can, and
dsd_fx rewrites the aten graph it makes like any other graph.
"""
import copy
import sys

import torch
import torch.nn.functional as F

import dsd_fx

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    print("skipped: needs transformers>=5 (pip install 'transformers>=5,<6')")
    sys.exit(0)

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     use_cache=False, attn_implementation="sdpa")
model = LlamaForCausalLM(config)
reference = copy.deepcopy(model)  # the untouched model, for the proof
ids = torch.randint(0, 256, (2, 16))

# captured at (2, 16); every dimension of the example is Dim.AUTO, so it trains at other shapes
sparse = dsd_fx.transform(model, phase="sparse", capture="export", example_args=(ids,),
                          pattern="2:4", method="sr-ste")
print("masked weights:", len(dsd_fx.current_masks(sparse)))
opt = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
sparse.train()
data = torch.randint(0, 256, (8, 24))
for step in range(10):
    logits = sparse(data).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
print("loss after 10 SR-STE 2:4 steps:", round(loss.item(), 4))

dense = dsd_fx.transform(sparse, phase="dense").eval()  # the weights of the final 2:4 mask, masks gone
model.load_state_dict(dense.state_dict())  # strict: exactly the HF model's keys
model.eval()
torch.testing.assert_close(model(ids).logits, dense(ids).logits)
report = dsd_fx.verify_zero_overhead(reference, dense, (ids,))  # against the untouched HF model's export
print(report.table)
assert report.ok

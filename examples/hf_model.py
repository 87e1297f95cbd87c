"""A HuggingFace model traced with its own tracer: sparse -> a few training steps -> re-dense -> proof.

    pip install "transformers<4.48"   # the last versions with transformers.utils.fx
    python examples/hf_model.py

The model is a small BERT built from a config (random weights, no download). dsd_fx takes the
GraphModule that transformers' fx tracer makes and rewrites it like any other graph.
"""
import copy
import sys

import torch

import dsd_fx

try:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils.fx import symbolic_trace as hf_trace
except ImportError:
    print("skipped: needs transformers<4.48 (pip install 'transformers<4.48')")
    sys.exit(0)

torch.manual_seed(0)
config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=32, num_labels=2,
                    problem_type="single_label_classification")
model = BertForSequenceClassification(config).eval()
gm = hf_trace(model, input_names=["input_ids", "attention_mask", "labels"])
reference = copy.deepcopy(gm)

ids = torch.randint(0, 200, (16, 12))
mask = torch.ones_like(ids)
labels = (ids[:, 0] % 2).long()  # a toy task: parity of the first token

sparse = dsd_fx.transform(gm, phase="sparse", pattern="2:4", method="sr-ste")
print("masked weights:", len(dsd_fx.current_masks(sparse)))
opt = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
sparse.train()
for step in range(20):
    opt.zero_grad()
    loss = sparse(ids, mask, labels)["loss"]
    loss.backward()
    opt.step()
print("loss after 20 SR-STE 2:4 steps:", round(loss.item(), 4))

dense = dsd_fx.transform(sparse, phase="dense").eval()  # the weights of the final 2:4 mask, masks gone
# back into the HuggingFace model, every weight under its own name (the HF tracer's GraphModule
# also keeps two non-persistent buffers, position_ids and token_type_ids, hence strict=False)
missing, _ = model.load_state_dict(dense.state_dict(), strict=False)
assert not missing
report = dsd_fx.verify_zero_overhead(reference, dense, (ids[:1], mask[:1], labels[:1]))
print(report.table)
assert report.ok

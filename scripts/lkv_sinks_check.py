"""Diagnostic: the LKV (frozen LLM) adapter through its cache on the first 4 held-out documents at 2k,
with 0 (as trained) and 4 deployment-time sinks; dNLL% against the dense control rows of
results/eval/smollm2/matched.json. Output: results/lkv/smollm2-sinks-check.txt (printed)."""
import json

import torch

import spkv
from spkv.data.heldout import heldout_set
from spkv.eval.nll import nll_with_policy
from spkv.lkv import model_shares
from spkv.policies import LKVPolicy

torch.set_num_threads(1)
model, tok = spkv.load_model("smollm2-135m")
spkv.load_adapter(model, "adapters/lkv/smollm2-135m-lkv-frozen")
model.eval()
sh = torch.stack(list(model_shares(model).values()))
print("shares min/median/max", sh.min().item(), sh.median().item(), sh.max().item(), "n<1/32:", int((sh < 1/32).sum()), "of", sh.numel())
data = heldout_set(tok, seq_len=2048, max_sequences=4)
m = json.load(open("results/eval/smollm2/matched.json"))
ctrl = next(r for r in m["rows"] if r["method"] == "dense control")["nll_per_sequence"][:4]
c = sum(ctrl) / 4
for sinks in (0, 4):
    r = nll_with_policy(model, data, LKVPolicy(), sinks=sinks, chunk=512, desc=f"sinks{sinks}")
    print(f"sinks={sinks} density={r.density:.3f} nll={r.nll:.4f} dNLL%={100*(r.nll-c)/c:+.2f}")

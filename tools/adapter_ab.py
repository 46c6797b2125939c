"""Issue 36: the Llama adapter's rotary and norm paths against transformers' (the code before fa46d3e), in one process on
the embedded model, alternating; tokens compared. Run on an idle machine: OMP_NUM_THREADS=2 .venv/bin/python tools/adapter_ab.py"""
import statistics, dataclasses
from transformers.models.llama.modeling_llama import rotate_half
from skipbench.models import load_model
from skipbench.models.adapters import LlamaAdapter
from skipbench.engine import generate
from skipbench.policies import make_policy
from skipbench.data.prompts import encode_prompt

class Old(LlamaAdapter):
    def position_embeddings(self, h, positions):
        return self.base.rotary_emb(h, position_ids=positions)
    def _norm(self, norm, x):
        return norm(x)
    def _rotate(self, t, pos):
        cos, sin = pos
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return t * cos + rotate_half(t) * sin

lm = load_model("smollm2-135m", "cpu", "float32")
old = dataclasses.replace(lm, adapter=Old(lm.model))
ids = encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")
full = make_policy("full", lm.num_layers)
def step_ms(m):
    timings = []
    g = generate(m, [ids], full, 64, stop_at_eos=False, timings=timings)
    return 1e3 * statistics.median([s for p, s in timings if p == "decode"]), g.tokens
for m in (lm, old):
    generate(m, [ids], full, 8, stop_at_eos=False)
res = {"new": [], "old": []}
for r in range(4):
    for name, m in (("new", lm), ("old", old)) if r % 2 == 0 else (("old", old), ("new", lm)):
        ms, toks = step_ms(m)
        res[name].append(ms)
        res[name + "_tokens"] = toks
print({k: [round(x, 1) for x in v] for k, v in res.items() if not k.endswith("tokens")})
print("same tokens", res["new_tokens"] == res["old_tokens"])
print("median new/old", statistics.median(res["new"]) / statistics.median(res["old"]))

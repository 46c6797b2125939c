"""model.generate's own route to a compiled CPU step, for comparison with `bench --compile` (docs/BENCHMARKS.md, issue 36): the
HF model with a StaticCache, one decode step torch.compiled (argument: default, cpp for inductor's C++ wrapper, freeze for
freezing), against the same step eager; median of 60 steps. Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/hf_static_compile.py default"""
import time, statistics, torch, sys
from transformers import StaticCache
from skipbench.models import load_model
lm = load_model("smollm2-135m", "cpu", "float32")
m = lm.model.eval()
L = 128
ids = torch.tensor([[1, 504, 3458, 314, 260, 1234, 30, 2]])
def run(step_fn, n=64):
    cache = StaticCache(config=m.config, max_cache_len=L)
    with torch.no_grad():
        out = m(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(ids.shape[1]))
        tok = out.logits[:, -1:].argmax(-1)
        pos = ids.shape[1]
        ts = []; toks = []
        for i in range(n):
            t = time.perf_counter()
            logits = step_fn(tok, cache, torch.tensor([pos]))
            tok = logits[:, -1:].argmax(-1)
            toks.append(int(tok))
            ts.append(time.perf_counter() - t); pos += 1
    return 1e3 * statistics.median(ts[4:]), toks
def eager(tok, cache, cp):
    return m(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=cp).logits
mode = sys.argv[1] if len(sys.argv) > 1 else "default"
print("eager ms", run(eager)[0], flush=True)
import torch._inductor.config as ic
if "freeze" in mode:
    ic.freezing = True
if "cpp" in mode:
    ic.cpp_wrapper = True
comp = torch.compile(eager, fullgraph=False, dynamic=False)
t = time.perf_counter()
ms, toks = run(comp, n=8)
print("compile+8 steps s", time.perf_counter() - t, flush=True)
e_ms, e_toks = run(eager)
c_ms, c_toks = run(comp)
print("eager ms", e_ms, "compiled ms", c_ms, "same tokens", e_toks == c_toks, flush=True)

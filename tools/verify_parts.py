"""Per-part times on the embedded model, fp32 and bf16 in one process: a full-depth decode step, a verify pass of
K+1 tokens (5), and the head alone at 1, 2, 5 rows (docs/BENCHMARKS.md, issue 36). Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/verify_parts.py"""
import statistics, time, torch
from skipbench.models import load_model
from skipbench.engine import Engine
from skipbench.data.prompts import encode_prompt

def med(fn, n=15, warm=3):
    for _ in range(warm): fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)

for dtype in ("float32", "bfloat16"):
    lm = load_model("smollm2-135m", "cpu", dtype)
    ad = lm.adapter
    eng = Engine(ad, "fill", "gather")
    ids = torch.tensor([encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")])
    present = torch.ones_like(ids, dtype=torch.bool)
    cache = eng.prompt_cache(present, ids.shape[1] + 80)
    eng.forward(ids, cache, present=present, last_only=True)
    base = cache.length
    def step(n):
        def f():
            cache.length = base
            eng.forward(torch.zeros(1, n, dtype=torch.long), cache)
        return f
    h1 = torch.randn(1, 1, ad.model.config.hidden_size, dtype=lm.dtype)
    res = {"decode step": med(step(1)), "verify 5": med(step(5)), "verify 2": med(step(2))}
    for rows in (1, 2, 5):
        h = torch.randn(1, rows, ad.model.config.hidden_size, dtype=lm.dtype)
        res[f"head {rows} rows"] = med(lambda: ad.head(h))
    res["verify5/step"] = res["verify 5"] / res["decode step"]
    print(dtype, {k: round(v, 2) for k, v in res.items()}, flush=True)

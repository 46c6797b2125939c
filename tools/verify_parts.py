"""Per-part times on the embedded model, fp32 and bf16 in one process: a full-depth decode step, a verify pass of
K+1 tokens (5), and the head alone at 1, 2, 5 rows (docs/BENCHMARKS.md, issue 36). Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/verify_parts.py"""
import torch
from timing import engine_pass, median_ms as med
from skipbench.models import load_model
from skipbench.engine import Engine

for dtype in ("float32", "bfloat16"):
    lm = load_model("smollm2-135m", "cpu", dtype)
    ad = lm.adapter
    step = engine_pass(lm, Engine(ad, "fill", "gather"))
    h1 = torch.randn(1, 1, ad.model.config.hidden_size, dtype=lm.dtype)
    res = {"decode step": med(step(1)), "verify 5": med(step(5)), "verify 2": med(step(2))}
    for rows in (1, 2, 5):
        h = torch.randn(1, rows, ad.model.config.hidden_size, dtype=lm.dtype)
        res[f"head {rows} rows"] = med(lambda: ad.head(h))
    res["verify5/step"] = res["verify 5"] / res["decode step"]
    print(dtype, {k: round(v, 2) for k, v in res.items()}, flush=True)

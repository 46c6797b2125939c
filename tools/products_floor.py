"""What a decode step and a verify pass would cost if they were nothing but their matrix products (issue 36,
docs/BENCHMARKS.md). On the embedded model's own weights, in one process: the read rate (`bench`'s measurement), every
projection of every layer and the head applied in order to 1 and to 5 rows (F.linear, as the engine calls them), and
the compiled engine's full-depth step and 5-token verify pass. Run on an idle machine:
OMP_NUM_THREADS=2 .venv/bin/python tools/products_floor.py"""
import statistics

import torch
import torch.nn.functional as F
from timing import engine_pass as engine_pass_of, median_ms

from skipbench.engine import Engine
from skipbench.engine.costs import measure_read_rate
from skipbench.engine.forward import enable_compile
from skipbench.models import load_model


lm = load_model("smollm2-135m", "cpu", "float32")
ad = lm.adapter
hidden = lm.model.config.hidden_size
# the weights in the order a step reads them: each layer's projections, then the (tied) head
linears = [m.weight for layer in lm.model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
weights = linears + [lm.model.lm_head.weight]
step_bytes = sum(w.numel() * w.element_size() for w in weights)
rates = [measure_read_rate(torch.device("cpu"), torch.float32).bytes_per_s for _ in range(3)]


def products(rows):
    xs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
    return lambda: [F.linear(xs[w.shape[1]], w) for w in weights]


enable_compile(ad)
engine_pass = engine_pass_of(lm, Engine(ad, "fill", "auto"))

res = {}
for rep in range(2):  # the first round compiles the engine's two graphs
    res = {"products 1 row": median_ms(products(1)), "products 5 rows": median_ms(products(5)),
           "compiled step": median_ms(engine_pass(1)), "compiled verify 5": median_ms(engine_pass(5))}
rates += [measure_read_rate(torch.device("cpu"), torch.float32).bytes_per_s for _ in range(3)]
rate = statistics.median(rates)  # three measurements before the timings and three after: the rate drifts
bound_ms = 1e3 * step_bytes / rate
print(f"read rate {rate / 1e9:.1f} GB/s (median of {', '.join(f'{r / 1e9:.1f}' for r in rates)}); a step reads {step_bytes / 1e6:.0f} MB in {len(weights)} products: "
      f"{bound_ms:.1f} ms at the rate")
for k, v in res.items():
    print(f"{k}: {v:.1f} ms ({bound_ms / v:.0%} of the bound)")
print(f"products 5 rows / 1 row: {res['products 5 rows'] / res['products 1 row']:.2f}; "
      f"compiled verify 5 / step: {res['compiled verify 5'] / res['compiled step']:.2f}; "
      f"products 1 row / compiled step: {res['products 1 row'] / res['compiled step']:.2f}")

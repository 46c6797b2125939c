"""Issue 36's engine measurements on the embedded model (docs/BENCHMARKS.md): a decode step before and after enable_compile (since a760ffc the whole pass of a static plan; before, each layer's maths). Run on an idle machine: OMP_NUM_THREADS=2 .venv/bin/python tools/compile_ab.py"""
import time, statistics
from skipbench.models import load_model
from skipbench.engine import generate
from skipbench.engine.forward import enable_compile
from skipbench.policies import make_policy
from skipbench.data.prompts import encode_prompt
lm = load_model("smollm2-135m", "cpu", "float32")
ids = encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")
full = make_policy("full", lm.num_layers)
def step_ms():
    timings = []
    generate(lm, [ids], full, 64, stop_at_eos=False, timings=timings)
    return 1e3 * statistics.median([s for p, s in timings if p == "decode"])
generate(lm, [ids], full, 8, stop_at_eos=False)
base = [step_ms() for _ in range(2)]
t = time.perf_counter()
enable_compile(lm.adapter)
generate(lm, [ids], full, 8, stop_at_eos=False)
print("compile warmup s", round(time.perf_counter() - t, 1))
comp = [step_ms() for _ in range(2)]
print("base ms", [round(x, 1) for x in base], "compiled ms", [round(x, 1) for x in comp])

"""Issue 36's engine measurements on the embedded model (docs/BENCHMARKS.md): the decode step and its torch.profiler table. Run on an idle machine: OMP_NUM_THREADS=2 .venv/bin/python tools/profile_decode.py"""
import time, statistics
from skipbench.models import load_model
from skipbench.engine import generate
from skipbench.policies import make_policy
from skipbench.data.prompts import encode_prompt
lm = load_model("smollm2-135m", "cpu", "float32")
ids = encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")
full = make_policy("full", lm.num_layers)
generate(lm, [ids], full, 8, stop_at_eos=False)
timings = []
t = time.perf_counter(); g = generate(lm, [ids], full, 64, stop_at_eos=False, timings=timings); el = time.perf_counter() - t
dec = [s for p, s in timings if p == "decode"]
print("decode step median ms", 1e3 * statistics.median(dec), "mean", 1e3 * statistics.mean(dec))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    generate(lm, [ids], full, 32, stop_at_eos=False)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

"""Issue 36's engine measurements on the embedded model (docs/BENCHMARKS.md): torch calls per decode step, by source line. Run on an idle machine: OMP_NUM_THREADS=2 .venv/bin/python tools/count_torch_calls.py"""
import collections, sys
from torch.overrides import TorchFunctionMode
from skipbench.models import load_model
from skipbench.engine import generate
from skipbench.policies import make_policy
from skipbench.data.prompts import encode_prompt
lm = load_model("smollm2-135m", "cpu", "float32")
ids = encode_prompt(lm.tokenizer, "Please calculate the sum of 99, 45 and 12.")
full = make_policy("full", lm.num_layers)
generate(lm, [ids], full, 4, stop_at_eos=False)
counts = collections.Counter()
class M(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        f = sys._getframe(1)
        while f and ("torch/" in f.f_code.co_filename):
            f = f.f_back
        where = f"{f.f_code.co_filename.split('/')[-1]}:{f.f_lineno}" if f else "?"
        counts[(getattr(func, '__name__', str(func)), where)] += 1
        return func(*args, **(kwargs or {}))
with M():
    generate(lm, [ids], full, 5, stop_at_eos=False)
tot = sum(counts.values())
print("torch calls per step ~", tot / 4)
for (fn, where), c in counts.most_common(45):
    print(f"{c/4:7.1f}  {fn:30s} {where}")

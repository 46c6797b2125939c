"""`skipbench lm-eval`: policy sweeps over lm-evaluation-harness tasks through skipbench's backend.

The recipe is the sweep library's run (skipbench/lmeval_sweep.py): one cached part per (task, policy point), lm-eval's
results per point, torchrun sharding. `compare` runs its points through the same library, never this module.
"""

from skipbench.lmeval_sweep import LmEvalConfig, LmEvalResult, run, summarise

__all__ = ["LmEvalConfig", "LmEvalResult", "run", "summarise"]

"""`skipbench evaluate`: generation quality of policies at several costs, one tidy row per (policy point, item).

The recipe is the evaluation library's run (skipbench/evaluation.py): per-point parquet parts that resume, the
full-depth point always run so `full_rougeL` is defined, torchrun sharding. Other recipes (the controllers sweep's
held-out evaluation) use the same library, never this module.
"""

from skipbench.evaluation import EvalConfig, EvalResult, run, summarise

__all__ = ["EvalConfig", "EvalResult", "run", "summarise"]

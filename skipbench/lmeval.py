"""skipbench's model for lm-evaluation-harness, public: `import skipbench.lmeval` registers it as `skipbench`
(`lm_eval.simple_evaluate(model="skipbench", model_args="model=smollm2-135m,policy=uniform:15", ...)`), and
`TASKS_DIR` is the folder of the offline tasks shipped with skipbench (`TaskManager(include_path=TASKS_DIR)`).
The model lives in skipbench/evaluation/lmeval_model.py; this module is its stable name."""

from skipbench.evaluation.lmeval_model import TASKS_DIR, SkipbenchLM

__all__ = ["SkipbenchLM", "TASKS_DIR"]

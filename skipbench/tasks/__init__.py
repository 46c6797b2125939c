"""lm-eval task YAMLs over the embedded suites (offline), and `utils.py`, which they name (`!function utils.NAME`).

A folder of files lm-eval indexes, not a module skipbench imports: `skipbench lm-eval` and the `skipbench` lm-eval
model find it at `skipbench.lmeval.TASKS_DIR`.
"""

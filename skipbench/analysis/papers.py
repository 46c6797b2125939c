"""The papers' reference numbers that skipbench's findings are set against (reported there, not measured here)."""

# Glavas et al. Sec. 3.3: the oracle matches the full model at 5.6 of 24 layers on Alpaca, 5.5 on CNN-DM
PAPER_STAR = {"alpaca": 5.6 / 24 * 100, "cnn_dailymail": 5.5 / 24 * 100}
PAPER_MODEL_FAMILY = "opt"  # OPT-IML-1.3B fine-tuned on Alpaca

# FlexiDepth (Luo et al.): layers used, of 32, per subtask, and the orderings they report
FLEXI_PAPER = {"copy": 22.0, "summarize": 28.7, "continue": 30.3, "repeat": 20.1, "sum": 22.5, "product": 23.9}
FLEXI_ORDERS = (("copy", "summarize", "continue"), ("repeat", "sum", "product"))

# Retain % as the FlexiDepth talk reports it (Llama-3-8B-Instruct, 32 layers; MMLU, HellaSwag, WinoGrande, GSM8K,
# HumanEval, CoQA), by skipped layers: the reference the report prints beside a run's own table. Not measured here.
TALK = {"flexidepth": {4: 106.5, 8: 100.7}, "shortgpt": {4: 69.1, 8: 32.0}, "laco": {4: 81.7, 8: 65.3},
        "mindskip": {4: 84.2, 8: 60.2}, "layerskip": {4: 54.0, 8: 43.9}}

# the talk's setting: its model and six benchmarks (its headline: FlexiDepth keeps the full model's scores)
TALK_MODEL, TALK_TASKS = "llama-3-8b-instruct", ("mmlu", "hellaswag", "winogrande", "gsm8k", "humaneval", "coqa")

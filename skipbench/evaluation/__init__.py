"""Scoring a policy with a model: generation quality (quality: the `evaluate` sweep), hidden-state fidelity
(fidelity), the draft layer-set search (draft_search), skipbench's lm-eval model (lmeval_model) and policy sweeps over
lm-eval tasks (lmeval_sweep). Library code: recipes compose these."""

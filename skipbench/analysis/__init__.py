"""Numbers from written results, with no model and no torch: intervals and verdict rules (stats), the sequence-level
multiple-choice knapsack (knapsack), per-item scores of configurations (scores), the papers' claims against our runs
(verdicts, papers), lm-eval result tables (lmeval_tables), ROUGE-L and exact match (metrics), and figures (plots)."""

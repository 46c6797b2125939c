"""Results on disk: tidy parquet with a manifest (results), the checked readers of every file read back (readers),
checkpoints (checkpoints), and torchrun's data-parallel shares (distributed)."""

"""LayerSkip (Elhoushi et al., 2024) at inference: early exit on the model the LayerSkip recipe fine-tuned.

`layerskip:DIR` names the output of `skipbench finetune --dropout-schedule exp --early-exit-loss E` (its `best/`
model folder, or any model folder) and `-o exit=E` the layers run before the shared head (0: every layer). The policy
runs on that folder's model (`Policy.lm`), which must have the loaded model's depth: it stands for the same layers.
Self-speculative decoding with the early-exit draft is `--model DIR/best --draft early-exit:E` (the same path as any
draft); this strategy is what `compare` puts beside the other methods at a number of skipped layers.
"""

from __future__ import annotations

from pathlib import Path

from skipbench.store import readers
from skipbench.errors import SkipbenchError, note
from skipbench.policies.static import PlanPolicy


def model_folder(path: str) -> Path:
    """The model folder a `layerskip:DIR` names: DIR/best for a fine-tuning output, else DIR itself."""
    folder = Path(path)
    if (folder / "best" / "config.json").exists():
        return folder / "best"
    if not (folder / "config.json").exists():
        raise SkipbenchError(f"layerskip: '{path}' is neither a `skipbench finetune` output (DIR/best) nor a model folder")
    return folder


def recipe(path: str) -> dict | None:
    """The fine-tuning settings `skipbench finetune` recorded beside DIR/best, if any."""
    record = Path(path) / "config.json"
    if not (Path(path) / "best").is_dir() or not record.exists():
        return None
    return readers.json_file(record, "fine-tuning config", "run `skipbench finetune` again")


def build(spec, ctx):
    from skipbench.models.loading import load_beside

    folder = model_folder(spec.value)
    run = recipe(spec.value)
    if run is not None and (run.get("dropout_schedule", "uniform") != "exp" or not run.get("early_exit_loss")):
        note(f"layerskip: '{spec.value}' was fine-tuned without the LayerSkip recipe (dropout schedule "
             f"{run.get('dropout_schedule', 'uniform')}, early-exit loss {run.get('early_exit_loss', 0.0)}); "
             "`skipbench finetune --dropout-schedule exp --early-exit-loss 1` is the recipe")
    tuned = load_beside(str(folder), ctx.lm, "layerskip")
    if tuned.num_layers != ctx.num_layers:
        raise SkipbenchError(f"layerskip: '{folder}' has {tuned.num_layers} layers, the loaded model {ctx.num_layers}; "
                             "fine-tune the loaded model")
    exit_at = spec.opt("exit") or ctx.num_layers
    if not 1 <= exit_at <= ctx.num_layers:
        raise SkipbenchError(f"layerskip: -o exit must be in 1..{ctx.num_layers}, got {exit_at}")
    policy = PlanPolicy(ctx.num_layers, list(range(exit_at)), spec.label)
    policy.lm, policy.origin = tuned, list(range(ctx.num_layers))  # its layers stand for the loaded model's
    return policy


def plan(spec, ctx) -> list[int]:
    return list(range(spec.opt("exit") or ctx.num_layers))

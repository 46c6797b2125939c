"""Who decides which layer runs for which token.

A strategy is a module here plus its entry in policies/spec.py (or a plugin's entry point). Every command names
policies with one grammar (`uniform:15`, `uniform:8,15,22`, `layers:0,3,5`, `controller:DIR`), parsed into
`PolicySpec`s by `parse_policies`; `spec.build(num_layers, lm, data)` gives the engine its `Policy`
(engine/protocol.py); the model and data matter only to strategies whose entry needs them.
This package's import is light (no torch) so `skipbench plan` and `--help` stay fast.
"""

from skipbench.policies.spec import STRATEGIES, Context, Option, PolicySpec, Strategy, parse_policies, with_costs


def make_policy(text: str, num_layers: int, lm=None, data=None, **options):
    """The Policy of one spec written as text (`uniform:15`, `random-token:22`, `flexidepth:DIR`), options such as
    seed= beside it; `lm` (and `data`) for strategies computed from a model (`confidence`, `block-influence`)."""
    specs = parse_policies(text, **options)
    if len(specs) != 1:
        from skipbench.errors import SkipbenchError

        raise SkipbenchError(f"'{text}' names {len(specs)} policies; one is needed here")
    return specs[0].build(num_layers, lm, data)


__all__ = ["STRATEGIES", "Context", "Option", "PolicySpec", "Strategy", "make_policy", "parse_policies", "with_costs"]

"""`route:DIR`: generate each item with the configuration a prompt-level router assigned it (policies/router.py).

The decision is made once per prompt, before generation, from the prompt alone (never from an output): the router
predicts every configuration's score of each item of the run, and then (`-o assign=`)

* `knapsack` (default): the exact knapsack assigns configurations to the run's items under the mean budget
  (`--budget B`, or `-o budget=B`), as `skipbench route curve` does on the test split: the budget holds exactly
  over the run, and an item's configuration depends on the other items' predictions;
* `price`: each item alone takes argmax predicted score - price x cost, the price set on the router's validation
  items to meet the budget there; an item's configuration depends on its prompt only, and the run's mean cost
  meets the budget only as well as the validation items stand for the run's.

A route policy is per-sequence: a row runs its configuration's layers for every generated token.

It needs the run's items (a dataset), so it runs in `evaluate` (and any command that passes one); the items must be
ones the router was neither trained nor tuned on. Each row records its configuration and what its features cost
(`route_config`, `route_feature_passes`: the prompt's tokens times the layers the features read; a hidden-state
router's are shared with the full-depth prefill under `--prompt-depth full`, but this implementation runs them in a
separate, cached pass).
"""

from __future__ import annotations

from skipbench.engine.protocol import Policy
from skipbench.errors import SkipbenchError, note
from skipbench.policies import router as routing
from skipbench.policies.static import SequencePlans


class RoutePolicy(SequencePlans):
    def __init__(self, num_layers: int, plans: dict[str, list[int]], chosen: dict[int, str], feature_passes: dict[int, int],
                 name: str) -> None:
        super().__init__(num_layers)
        self.plans, self.chosen, self.feature_passes, self.name = plans, chosen, feature_passes, name
        self._keys: list[int] = []

    def layers_for(self, key: int) -> list[int]:
        return self.plans[self.chosen[key]]

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        missing = [k for k in (row_keys or [None] * batch_size) if k not in self.chosen]
        if missing:
            raise SkipbenchError(f"policy '{self.name}' routes the items of its run's dataset only; {len(missing)} "
                                 "sequence(s) are not among them (use it with evaluate --dataset)")
        self._keys = list(row_keys)
        self.plan_rows(self._keys)

    def new_step(self, positions) -> None:
        self._gates = self.sequence_gates(positions)

    def row_record(self, row: int) -> dict:
        key = self._keys[row]
        return {"route_config": self.chosen[key], "route_feature_passes": self.feature_passes[key]}


def build(spec, ctx) -> Policy:
    from skipbench.data import load_items
    from skipbench.policies.spec import parse_policies

    router = routing.load(spec.value)
    budget = spec.opt("budget")
    if budget <= 0:
        raise SkipbenchError(f"policy '{spec.label}' needs a mean budget of layers per token: --budget B "
                             f"(or -o budget=B), between {min(router.costs):g} and {max(router.costs):g}")
    routing.check_budget(budget, router.costs, f"policy '{spec.label}'")
    router.check_model(ctx.lm, spec.value)
    if ctx.data is None:
        raise SkipbenchError(f"policy '{spec.label}' assigns configurations to the items of a dataset under a mean "
                             "budget: use it with evaluate --dataset (and a split it was not trained on)")
    items = load_items(ctx.data)
    trained_on = router.meta["dataset"].get("name")
    if ctx.data.name != trained_on:
        note(f"policy '{spec.label}' routes items of {ctx.data.name} with a router trained on {trained_on}"
             + (" (and the price set on its validation items)" if spec.opt("assign") == "price" else ""))
    seen = set(router.meta.get("train_ids", ())) | set(router.meta.get("validation_ids", ()))
    used = sum(it.item_id in seen for it in items)
    if used:
        raise SkipbenchError(f"{used} of the {len(items)} items were used to train or tune '{spec.value}'; route "
                             "held-out items, e.g. --split test")
    plans = {c: parse_policies(c)[0].plan(ctx.num_layers, ctx.lm, ctx.data) for c in router.configs}
    predicted = router.predict(ctx.lm, items, ctx.data.name)
    if spec.opt("assign") == "price":
        from skipbench.analysis.knapsack import Instance, choose_at_price

        choice = choose_at_price(Instance(predicted, router.costs), routing.price_for(router, ctx.lm, budget))
    else:
        choice = routing.assign(predicted, router.costs, budget)
    lengths = [len(p) for p in routing.prompt_ids(ctx.lm, items, router.features.max_prompt_tokens)]
    chosen = {it.key: router.configs[k] for it, k in zip(items, choice)}
    passes = {it.key: n * router.features.layers_run for it, n in zip(items, lengths)}
    return RoutePolicy(ctx.num_layers, plans, chosen, passes, spec.label)

"""One rank of tests/test_placement.py's tensor-parallel check (run by torchrun with 2 processes, gloo): the tiny model
sharded with --tp 2's placement, greedy generation at full depth and under a per-token policy, the last step's
logits, and per decode step the calls of the row-wise projections (o_proj, down_proj: each all-reduces once) and the
layers run; rank 0 writes every rank's record to the JSON file given."""

from __future__ import annotations

import json
import sys

import torch

from skipbench.engine import generate
from skipbench.engine.forward import Engine
from skipbench.models.loading import Placement, load_model, placing
from skipbench.policies import make_policy
from skipbench.store.distributed import rank


def router(lm):
    """An untrained FlexiDepth router (seeded: the same weights on every rank and in one process) whose gates sit
    around its threshold: it decides from the hidden state, which each rank computes from its shards."""
    from skipbench.policies.flexidepth import FlexiDepth, FlexiPolicy

    torch.manual_seed(0)
    flexi = FlexiDepth(lm.model.config.hidden_size, lm.num_layers, reduction=4)
    with torch.no_grad():
        for r in flexi.routers.values():
            r.out.bias.fill_(0.0)
    return FlexiPolicy(flexi)


def main(folder: str, path: str) -> None:
    torch.manual_seed(0)
    with placing(Placement(tp=2)):
        lm = load_model(folder, "cpu", "float32")
        calls = []
        for layer in lm.adapter.layers:  # every row-wise product is one all-reduce inside its forward
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.register_forward_hook(lambda *_: calls.append(1))
        prompts = [[5, 9, 14, 3, 22], [7, 7, 30], [11, 2, 8, 19]]
        record = {"rank": rank(), "heads": lm.adapter.num_heads, "kv_heads": lm.adapter.num_kv_heads}
        for name in ("full", "random-token:3", "flexidepth"):
            policy = router(lm) if name == "flexidepth" else make_policy(name, lm.num_layers, lm, seed=1)
            counts: list[int] = []
            engine_forward = Engine.forward

            def counted(self, *a, **kw):
                before = len(calls)
                out = engine_forward(self, *a, **kw)
                counts.append(len(calls) - before)
                return out

            Engine.forward = counted
            try:
                gen = generate(lm, prompts, policy, 8, "fill")
            finally:
                Engine.forward = engine_forward
            record[name] = {"tokens": gen.tokens, "layers": gen.layers, "all_reduces": counts}
        _, out = Engine(lm.adapter).prefill(torch.tensor([prompts[0]]), torch.ones(1, 5, dtype=torch.bool), 8)
        record["logits"] = out.logits[0, -1].tolist()
        every = [None, None]
        torch.distributed.all_gather_object(every, record)
        if rank() == 0:
            with open(path, "w") as f:
                json.dump(every, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

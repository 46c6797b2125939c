"""Gumbel-softmax skip controllers (Glavas et al. Sec. 3.2, App. A.4).

One linear controller per gated layer (every layer but the first and the last) maps its input to two
logits (skip, execute). Input `hidden`: the detached hidden state entering the layer; input
`constant`: an all-ones vector of the same size, which can only learn a per-layer skip rate.
Training uses straight-through hard Gumbel samples at temperature tau; evaluation samples (`sample`,
as in the paper) or thresholds (`argmax`).

Cost term, per response token, in one of two units (recorded with the checkpoint):
  fraction  alpha * fraction of the L layers executed (first and last included). What the authors' released
            code computes (AdalasOPT: every layer, the ungated first and last included, appends the fraction of
            response tokens that executed it, and the loss adds `torch.mean(...) * alpha` over the L layers; it
            averages per sequence first, skipbench per token). The paper's alphas 2-10 were run in these units.
            The default.
  sum       alpha * sum of the gates (executed gated layers): the reading "alpha multiplies the sum of the
            gates"; alpha_sum = alpha_fraction / L.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skipbench import keyed
from skipbench.store.checkpoints import BACKBONE, checked_module, load_checkpoint, load_module
from skipbench.engine.protocol import Gate, Policy, follows
from skipbench.errors import SkipbenchError

INPUTS = ("hidden", "constant")
ALPHA_UNITS = ("fraction", "sum")
GATES = ("sample", "argmax")


class Controllers(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, input_kind: str = "hidden", init_execute: float = 3.0) -> None:
        super().__init__()
        if input_kind not in INPUTS:
            raise SkipbenchError(f"--input must be one of {', '.join(INPUTS)}, got '{input_kind}'")
        if num_layers < 3:
            raise SkipbenchError("skip controllers need a model of at least 3 layers (the first and last always run)")
        self.input_kind, self.num_layers, self.hidden_size = input_kind, num_layers, hidden_size
        self.gated = list(range(1, num_layers - 1))
        self.linears = nn.ModuleList([nn.Linear(hidden_size, 2) for _ in self.gated])
        with torch.no_grad():  # start close to the full model: execute with probability ~0.95
            for lin in self.linears:
                lin.weight.mul_(0.01)
                lin.bias.copy_(torch.tensor([0.0, init_execute]))
        self.slot = {layer: j for j, layer in enumerate(self.gated)}

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        lin = self.linears[self.slot[layer]]
        if self.input_kind == "constant":
            x = torch.ones(hidden.shape, dtype=lin.weight.dtype, device=hidden.device)
        else:
            x = hidden.detach().to(lin.weight.dtype)
        return lin(x)


def keyed_uniform(keys: list, num_tokens: int, num_gated: int, device) -> torch.Tensor:
    """Uniform noise [B, T, gated layers, 2] in (0, 1), row r drawn from the generator of keys[r] (keyed.uniform)."""
    return torch.from_numpy(keyed.uniform(keys, (num_tokens, num_gated, 2))).to(device)


COST_TERMS = {"sum": "alpha * sum of the gates (executed gated layers) per response token, mean over tokens",
              "fraction": "alpha * fraction of the layers executed per response token, mean over tokens"}


class ControllerMethod:
    """The trainable side, for skipbench.training."""

    kind = "controllers"
    routes = False
    unused_params = False
    kv_mode = "fill"

    def __init__(self, controllers: Controllers, alpha: float, tau: float = 1.0, alpha_units: str = "fraction") -> None:
        if tau <= 0:
            raise SkipbenchError(f"--tau must be > 0, got {tau}")
        if alpha_units not in ALPHA_UNITS:
            raise SkipbenchError(f"--alpha-units must be one of {', '.join(ALPHA_UNITS)}, got '{alpha_units}'")
        self.controllers, self.alpha, self.tau, self.alpha_units = controllers, alpha, tau, alpha_units

    def module(self) -> nn.Module:
        return self.controllers

    def gate_fn(self, keys: list | None = None):
        """Straight-through hard Gumbel-softmax gates. `keys` (one per row, e.g. (seed, step, example)) seed
        each row's noise, so a row's gates do not depend on its batch: data-parallel ranks and micro-batches
        draw what one big batch would. Without keys, the row index is the key."""
        c, noise = self.controllers, {}

        def gate(layer: int, hidden: torch.Tensor):
            if layer not in c.slot:
                return True
            logits = c.logits(layer, hidden)
            if "u" not in noise:
                rows = keys if keys is not None else [(r,) for r in range(hidden.shape[0])]
                noise["u"] = keyed_uniform(rows, hidden.shape[1], len(c.gated), logits.device)
            # F.gumbel_softmax draws from the global generator; the same maths with keyed noise
            gumbel = -torch.log(-torch.log(noise["u"][:, :, c.slot[layer]].to(logits.dtype)))
            soft = torch.softmax((logits + gumbel) / self.tau, -1)
            hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
            return (hard - soft.detach() + soft)[..., 1].to(hidden.dtype)

        return gate

    def regulariser(self, gates, mask):
        m = mask.to(gates[0].dtype)
        gated = torch.stack(gates).sum(0)
        executed = gated + (self.controllers.num_layers - len(gates))
        layers = float((executed * m).sum().detach() / m.sum())
        per_token = {"sum": gated, "fraction": executed / self.controllers.num_layers}[self.alpha_units]
        return self.alpha * (per_token * m).sum(), {"layers": layers}

    def config(self) -> dict:
        c = self.controllers
        return {"input": c.input_kind, "alpha": self.alpha, "tau": self.tau, "hidden_size": c.hidden_size,
                "num_layers": c.num_layers, "gated_layers": c.gated,
                "alpha_units": self.alpha_units, "cost_term": COST_TERMS[self.alpha_units]}


class ControllerPolicy(Policy):
    """Trained controllers deciding per token at evaluation time."""

    static = False

    def __init__(self, controllers: Controllers, gate: str = "sample", seed: int = 0, tau: float = 1.0) -> None:
        super().__init__(controllers.num_layers)
        if gate not in GATES:
            raise SkipbenchError(f"--gate must be one of {', '.join(GATES)}, got '{gate}'")
        self.c, self.mode, self.seed, self.tau = controllers.eval(), gate, seed, tau
        self.name = f"controller-{controllers.input_kind}"
        self._keys: list = []
        self._noise: torch.Tensor | None = None

    def begin(self, batch_size: int, row_keys=None) -> None:
        self._keys = list(row_keys) if row_keys is not None else list(range(batch_size))

    def new_step(self, positions: torch.Tensor) -> None:
        """Noise per (seed, row key, position), like random skipping: a token's draw does not depend on its
        batch, so batch sizes and data-parallel shards give the same choices."""
        if self.mode != "sample":
            return
        if len(self._keys) != positions.shape[0]:
            self.begin(positions.shape[0])
        gated = len(self.c.gated)
        u = np.stack([keyed.uniform([(self.seed, self._keys[r], p) for p in row], (gated, 2))
                      for r, row in enumerate(positions.cpu().numpy())])
        self._noise = torch.from_numpy(u).to(positions.device)  # [B, T, gated, 2]

    @torch.no_grad()
    def gate(self, layer: int, hidden: torch.Tensor) -> Gate:
        if layer not in self.c.slot:
            return True
        follows(self.c.linears[self.c.slot[layer]], hidden.device)  # each layer's controller on its layer's device
        logits = self.c.logits(layer, hidden).float()
        if self.mode == "argmax":
            run = logits[..., 1] > logits[..., 0]
        else:  # hard Gumbel sample: the argmax of noisy logits (tau does not change the argmax)
            noisy = logits - torch.log(-torch.log(self._noise[:, :, self.c.slot[layer]].float().to(logits.device)))
            run = noisy[..., 1] > noisy[..., 0]
        if bool(run.all()):
            return True
        if not bool(run.any()):
            return False
        return run


def load_controllers(path: str, model: dict | None = None) -> tuple[Controllers, dict]:
    return load_module(path, "controllers", lambda meta: Controllers(meta["hidden_size"], meta["num_layers"], meta["input"]),
                       model)


def check_backbone(path: str, model: str) -> None:
    """Controllers trained jointly with their backbone (`--train-backbone`) only make sense on that backbone."""
    from pathlib import Path

    meta, _ = load_checkpoint(path, "controllers")
    backbone = Path(path) / BACKBONE
    train = meta.get("train")
    if isinstance(train, dict) and train.get("train_backbone") and Path(model).resolve() != backbone.resolve():
        raise SkipbenchError(f"'{path}' was trained jointly with its backbone; evaluate it with --model {backbone}")


def controller(spec, ctx) -> Policy:
    c, meta = checked_module(spec.value, ctx, load_controllers)
    return ControllerPolicy(c, spec.gate, spec.seed, meta.get("tau", 1.0))

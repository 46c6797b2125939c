"""KnapSpec (ICML 2026, arXiv 2602.20217): a self-speculative draft whose attention and MLP sub-layers are skipped
apart, chosen as a 0/1 knapsack that maximises predicted tokens per second. A draft only (`--draft knapspec`).

Not skipbench's knapsack oracle (`skipbench oracle`, analysis/knapsack.py), which picks one static configuration per
item with hindsight of its quality; KnapSpec picks the draft's sub-layers during decoding, from a latency model.

After the prompt and then every `-o interval` rounds (default 64):

* **latency model**: on this machine, layer 0's attention at a one-token step is timed at several context lengths
  and fitted as c2 n + c3 (its cost grows with the context n), and its MLP is timed once (a constant); measured once
  per model shape and machine and cached, like the layer cost table (`<cache>/sublayer-costs/`). Every layer is
  taken to cost what layer 0 costs;
* **items and weights**: the 2L sub-layers, the first and last layers' never skipped; an MLP weighs 1, an attention
  round(t_attn(n) / t_mlp), between 1 and 5, at the current context n; at most half the skippable weight is
  skipped;
* **dynamic program**: over the sub-layers in order, each cell (sub-layers so far, weight skipped) keeps the one
  state, of running or skipping the sub-layer, closest in cosine to the full model's state after that sub-layer
  (the verify pass's states of each live row's last kept token; the state after an attention is computed from the
  state entering its layer); a cell below cosine 0.5 is dropped;
* **choice**: for each final cell's skip set S, its acceptance alpha is its top-1 agreement with the full model on
  the reference tokens (the kept tokens of the last rounds, at most `-o reference` of them, each run through S
  from its embedding against the cache), and the draft is the (S, d) with the most predicted tokens per second,
  (1 - alpha^(d+1)) / (1 - alpha) / (d t(S) + t_full), d = 1 .. `-o max-length`; t(S) sums the latency model over the
  sub-layers S runs (the embedding and the head left out of both times). The empty set (the full model as its own
  draft) is no candidate; when no candidate beats plain decoding's 1 / t_full, the next rounds draft nothing (plain
  decoding steps) until the next search.

The output is the full model's whatever S is (the verify pass decides every token).

Where this differs from the paper (kaist-flexml-lab/knapspec was read to check the algorithm; this is not it):

* the latency model is timed on this machine (the paper's on a GPU); the attention weight is at least 1 (the paper's
  rounding may give 0); the head and the embedding are left out of t(S) and t_full (on SmolLM2-135M the head is
  about a quarter of a decode step, so long drafts are predicted somewhat faster than they run);
* the capacity is half the weight of the skippable sub-layers (the first and last layers' excluded);
* the acceptance is measured on the newest `-o reference` kept tokens (default 8; the authors' code: the tokens of
  the last 5 rounds), taken from every row in turn at batch > 1;
* at batch > 1 the rows share S, with cosines summed over the rows' last kept tokens;
* the authors' code drafts a fixed gamma with a 0.7 confidence stop and leaves the program's d unused; here d is
  the maximiser's (the paper's TPT objective) and `--draft-threshold` still applies;
* a draft's layer-pass count (bench's, track's) counts a layer with either sub-layer run as run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from skipbench.engine.forward import Engine
from skipbench.engine.protocol import Gate, Policy, Round, Sublayers, moved
from skipbench.engine.speculative import Speculation
from skipbench.errors import SkipbenchError, note
from skipbench.policies.dynamic_exit import tokens_per_layer

VERSION = 1
CONTEXTS = (32, 128, 512)  # context lengths the attention is timed at (one-token steps)
PRUNE = 0.5  # a DP cell whose state's cosine to the full model's falls below this is dropped
ATTN_WEIGHT_MAX = 5


@dataclass(frozen=True)
class SublayerCosts:
    """Seconds of layer 0's sub-layers at a one-token step of batch 1: attention = c2 n + c3 in the context n."""

    c2: float
    c3: float
    mlp: float
    contexts: tuple[int, ...]
    attention: tuple[float, ...]  # the medians the line was fitted to

    def attn(self, n: int) -> float:
        return max(self.c2 * n + self.c3, 1e-9)


def sublayer_costs(adapter) -> SublayerCosts:
    """The latency model for this model shape and machine: read from the cache or measured (a few seconds) and
    kept (a damaged file is measured again)."""
    from skipbench.engine.costs import _shape_key
    from skipbench.models.loading import cache_dir
    from skipbench.store import readers
    from skipbench.store.results import write_text_atomic

    param = next(adapter.model.parameters())
    key = json.dumps({"shape": json.loads(_shape_key(adapter, "fill", 1, adapter.devices[0], param.dtype)),
                      "contexts": CONTEXTS, "version": VERSION}, sort_keys=True)
    path = cache_dir() / "sublayer-costs" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        try:
            saved = readers.json_file(path, "sub-layer cost table")
            costs = SublayerCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["costs"].items()})
            numbers = [costs.c2, costs.c3, costs.mlp]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or costs.mlp <= 0 \
                    or costs.c2 < 0 or costs.attn(1) <= 1e-9:
                raise TypeError("its times are not positive numbers")
            return costs
        except (readers.Unreadable, KeyError, TypeError) as exc:
            note(f"{exc if isinstance(exc, readers.Unreadable) else f'sub-layer cost table {str(path)!r} is damaged'}"
                 ": measuring it again")
    note("knapspec: timing layer 0's attention and MLP (once per model shape and machine)")
    costs = measure(adapter)
    try:
        write_text_atomic(path, json.dumps({"costs": asdict(costs), "key": json.loads(key)}))
    except OSError:
        pass  # measured again next time
    return costs


@torch.no_grad()
def measure(adapter) -> SublayerCosts:
    from skipbench.engine.costs import median_times

    param, device = next(adapter.model.parameters()), adapter.devices[0]  # layer 0's device (a placed model)
    engine = Engine(adapter, "fill")
    cache = engine.new_cache(1, max(CONTEXTS) + 1, device, param.dtype)
    cache.mark(range(adapter.num_layers), True, max(CONTEXTS))
    noise = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(1, 1, adapter.model.config.hidden_size, device=device, dtype=param.dtype, generator=noise)
    cases = {}
    for n in CONTEXTS:
        cache.length = n
        pos = moved(adapter.position_embeddings(h, cache.positions(1)), device)  # once per forward in a pass: not timed

        def attend(n=n, pos=pos):
            cache.length = n
            return engine.attend(0, h, pos, cache)
        cases[n] = attend
    cases["mlp"] = lambda: adapter.mlp_block(0, h)
    med = median_times(cases, device)
    attention = tuple(med[n] for n in CONTEXTS)
    c2, c3 = np.polyfit(np.array(CONTEXTS, dtype=float), np.array(attention), 1)  # least squares, as the paper fits
    if c2 < 0:  # noise on a short context range: no growth measured, a constant
        c2, c3 = 0.0, float(np.mean(attention))
    return SublayerCosts(float(c2), float(c3), med["mlp"], CONTEXTS, attention)


class KnapSpec(Policy):
    static = False  # its gates are Sublayers, not one bool per layer
    adapts = True
    plans_sublayers = True

    def __init__(self, adapter, interval: int, reference: int, max_length: int, name: str,
                 costs: SublayerCosts | None = None) -> None:
        super().__init__(adapter.num_layers)
        if interval < 1:
            raise SkipbenchError(f"policy '{name}': -o interval must be >= 1 (rounds between searches), got {interval}")
        if not 1 <= reference <= 1024:
            raise SkipbenchError(f"policy '{name}': -o reference must be between 1 and 1024 tokens, got {reference}")
        if not 1 <= max_length <= Speculation().k_max:
            raise SkipbenchError(f"policy '{name}': -o max-length must be between 1 and {Speculation().k_max}, "
                                 f"got {max_length}")
        if adapter.num_layers < 3:
            raise SkipbenchError(f"policy '{name}': KnapSpec keeps the first and last layers, so it needs at least 3")
        self.engine, self.name, self.interval, self.reference = Engine(adapter), name, interval, reference
        self.draft_lengths = torch.arange(1, max_length + 1)
        self.costs = costs or sublayer_costs(adapter)
        self.begin(1)

    def begin(self, batch_size: int, row_keys: list[int] | None = None) -> None:
        self.run = [True] * (2 * self.num_layers)  # sub-layer 2i: layer i's attention, 2i + 1: its MLP
        self.rounds = 0
        self.refs: list[tuple] = []  # (row, cache index, position, embedding state [d], full model's next token)
        self.searches: list[tuple[tuple[int, ...], int]] = []  # (skipped sub-layers, d) each search chose

    def gate(self, layer: int, hidden) -> Gate:
        attn, mlp = self.run[2 * layer], self.run[2 * layer + 1]
        return attn if attn == mlp else Sublayers(attn, mlp)

    @torch.no_grad()
    def after_round(self, done: Round) -> int | None:
        if not bool(done.live.any()):
            return None
        self._remember(done)
        self.rounds += 1
        if (self.rounds - 1) % self.interval:
            return None
        skipped, d = self.search(done)
        self.run = [s not in skipped for s in range(2 * self.num_layers)]
        self.searches.append((tuple(sorted(skipped)), d))
        return d

    def _remember(self, done: Round) -> None:
        """The round's kept tokens as reference tokens (the newest `reference` of them are kept)."""
        ad = self.engine.ad
        L = self.num_layers
        rows = done.live.nonzero()[:, 0].tolist()
        kept = {r: int(done.accepted[r]) + 1 for r in rows}
        targets = {r: ad.head(ad.final_norm(done.hidden[L][r, :kept[r]])).argmax(-1) for r in rows}
        for j in range(max(kept.values())):  # token by token across the rows, so the newest ones come from every row
            for r in rows:
                if j < kept[r]:
                    self.refs.append((r, done.start + j, int(done.positions[r, j]), done.hidden[0][r, j].clone(),
                                      int(targets[r][j])))
        self.refs = self.refs[-self.reference:]

    def weights(self, context: int) -> list[int]:
        w_attn = int(min(ATTN_WEIGHT_MAX, max(1, round(self.costs.attn(context) / self.costs.mlp))))
        return [w_attn if s % 2 == 0 else 1 for s in range(2 * self.num_layers)]

    def seconds(self, skipped: set[int], context: int) -> float:
        L = self.num_layers
        attn = sum(1 for i in range(L) if 2 * i not in skipped) * self.costs.attn(context)
        return attn + sum(1 for i in range(L) if 2 * i + 1 not in skipped) * self.costs.mlp

    def search(self, done: Round) -> tuple[set[int], int]:
        """The dynamic program on each live row's last kept token, then the TPT choice (module docstring)."""
        ad, L = self.engine.ad, self.num_layers
        rows = done.live.nonzero()[:, 0]
        last = done.accepted[rows]
        index = done.start + last
        pos_ids = done.positions[rows, last][:, None]
        x = [h[rows, last][:, None] for h in done.hidden]  # [R, 1, d] entering each layer, and leaving the last
        dtype = done.hidden[0].dtype
        pos = ad.position_embeddings(x[0], pos_ids)
        targets = []  # the full model's state after each sub-layer
        for i in range(L):
            targets += [self.engine.probe(i, x[i], pos, done.cache, rows, index, mlp=False), x[i + 1]]
        weights = self.weights(done.context)
        fixed = {0, 1, 2 * L - 2, 2 * L - 1}
        capacity = sum(w for s, w in enumerate(weights) if s not in fixed) // 2
        cells = {0: (x[0], frozenset())}  # skipped weight -> (state [R, 1, d], skipped sub-layers)
        for s in range(2 * L):
            i, attn = divmod(s, 2)
            attn = attn == 0
            keys = sorted(cells)
            states = torch.cat([cells[w][0] for w in keys])  # [J R, 1, d]
            J, R = len(keys), len(rows)
            ran = self.engine.probe(i, states.to(dtype), ad.position_embeddings(states, pos_ids.repeat(J, 1)),
                                    done.cache, rows.repeat(J), index.repeat(J), attn=attn, mlp=not attn)
            new: dict = {}
            options = [(w, ran[n * R:(n + 1) * R], cells[w][1]) for n, w in enumerate(keys)]
            if s not in fixed:
                options += [(w + weights[s], cells[w][0], cells[w][1] | {s}) for w in keys
                            if w + weights[s] <= capacity]
            for w, state, skipped in options:
                score = float(F.cosine_similarity(state.float(), targets[s].float(), dim=-1).sum())
                if score < PRUNE * R:
                    continue
                if w not in new or score > new[w][2] or (score == new[w][2] and len(skipped) > len(new[w][1])):
                    new[w] = (state, skipped, score)
            cells = {w: (st, sk) for w, (st, sk, _) in new.items()}  # w = 0 runs everything: cosine 1, never dropped
        return self._choose([sk for _, sk in cells.values() if sk], done)

    def _choose(self, candidates: list[frozenset], done: Round) -> tuple[set[int], int]:
        """The (S, d) of most predicted tokens per second; (nothing skipped, 0) when no candidate beats plain
        decoding (the next rounds are plain decoding steps)."""
        if not candidates:
            return set(), 0
        alphas = torch.tensor(self.agreement(candidates, done), dtype=torch.float64)
        n = done.context
        full = self.seconds(set(), n)
        per_candidate = torch.tensor([self.seconds(set(sk), n) for sk in candidates], dtype=torch.float64)
        # tokens per second, (1 - a^(d+1)) / (1 - a) / (d t(S) + t_full): DEL's TPL form with t(S) / t_full x L as the
        # draft's cost in layers (the same argmax)
        tpt = tokens_per_layer(alphas, per_candidate / full * self.num_layers, self.draft_lengths, self.num_layers)
        best = int(tpt.argmax())
        if float(tpt.flatten()[best]) <= 1 / self.num_layers:  # plain decoding: one token per t_full
            return set(), 0
        c, d = divmod(best, len(self.draft_lengths))
        return set(candidates[c]), int(self.draft_lengths[d])

    def agreement(self, candidates: list[frozenset], done: Round) -> list[float]:
        """Each candidate's top-1 agreement with the full model on the reference tokens, each token run from its
        embedding through the candidate's sub-layers against the cache (as a round's first draft step would run
        it); every candidate's tokens in one batch, split per layer by which sub-layers they run."""
        if not self.refs:
            return [0.0] * len(candidates)
        ad, C, N = self.engine.ad, len(candidates), len(self.refs)
        dev = done.hidden[0].device
        rows = torch.tensor([r for r, *_ in self.refs], device=dev).repeat(C)
        index = torch.tensor([k for _, k, *_ in self.refs], device=dev).repeat(C)
        positions = torch.tensor([[p] for _, _, p, *_ in self.refs], device=dev).repeat(C, 1)
        h = torch.stack([e for *_, e, _ in self.refs])[:, None].repeat(C, 1, 1)  # [C N, 1, d]
        pos = ad.position_embeddings(h, positions)
        owner = torch.arange(C, device=dev).repeat_interleave(N)
        for i in range(self.num_layers):
            runs = torch.tensor([[2 * i not in sk, 2 * i + 1 not in sk] for sk in candidates], device=dev)[owner]
            out = h.clone()
            for attn, mlp in ((True, True), (True, False), (False, True)):
                sel = ((runs[:, 0] == attn) & (runs[:, 1] == mlp)).nonzero()[:, 0]
                if len(sel):
                    p = None if pos is None else tuple(t[sel] for t in pos)
                    out[sel] = self.engine.probe(i, h[sel], p, done.cache, rows[sel], index[sel], attn=attn, mlp=mlp)
            h = out
        top = ad.head(ad.final_norm(h[:, 0])).argmax(-1).view(C, N)
        want = torch.tensor([t for *_, t in self.refs], device=top.device)
        return (top == want[None]).double().mean(1).tolist()


def build(spec, ctx) -> Policy:
    if ctx.lm.adapter.tp > 1:  # each rank would time its own latency model and choose its own sub-layers
        raise SkipbenchError("KnapSpec chooses its draft from latencies measured on this machine, which each rank of "
                             "--tp would measure apart (and then skip different sub-layers): run it without --tp")
    return KnapSpec(ctx.lm.adapter, spec.opt("interval"), spec.opt("reference"), spec.opt("max-length"), spec.label)

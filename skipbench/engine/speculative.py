"""Self-speculative decoding: a skipping policy drafts, the full model verifies, the output is the full model's.

After the full-depth prompt (which gives the first token), each round, for a batch of left-padded rows:

1. **draft**: from each row's last token (not yet in the cache), up to K tokens under the draft policy, one
   forward each. A row stops drafting at EOS, at its remaining length, or (`threshold`) after a token whose draft
   probability is below the threshold (Draft & Verify's and transformers' adaptive stop);
2. **verify**: one full-depth forward over [last, d1 .. dK] at the same cache positions (it writes every layer's
   K/V there again, so the draft's entries never outlive the round);
3. **accept**: greedy, the longest prefix of drafts equal to the verifier's argmax, then the verifier's own next
   token; sampling, Leviathan et al.'s rule (`sample_rule`), so tokens follow the full model's distribution
   (temperature and top-p applied to both p and q, each normalised);
4. **roll back** without copying: row r keeps [last, d1 .. d_{n_r}]; the cache's common length moves past the
   longest kept run, and a shorter row's remaining positions become holes (`KVCache.drop`: invalid at every
   layer, and its later tokens' position ids shift back by their number). At batch 1 there are no holes.

Two savings the draft's shape allows, both exact:

* a draft that runs the same layers for every token (a static plan; a per-sequence draw at batch 1) never reads
  the K/V of a layer it skips at its own positions before the verify pass writes them again, so it does not
  compute them (`Engine(write_skipped=False)`), whatever the KV mode;
* an **early-exit** draft (layers 0 .. E-1) computes exactly what the full model computes below E, so its K/V
  there are kept (LayerSkip's shared cache) and the verify pass resumes its tokens at layer E from the states
  the draft left; only the last draft token, which the draft never fed, runs layers 0 .. E-1 first.

"Equal to plain decoding" is exact in exact arithmetic: the verify pass computes K + 1 positions in one forward
where plain decoding computes one, so a near-tie between two logits can round the other way in low precision or
on another kernel; `evaluate --draft` records `matches_full` per item, and the tests (float32, CPU) require
equality.

`--speculate auto` starts at K and adapts between rounds as transformers' assisted generation does: K + 2 after a
round in which every row accepted all it drafted, else K - 1 (between 1 and `k_max`).

A draft that `adapts` (CLaSp, DEL: engine/protocol.py) gets, after the prompt and after each round, what the verify
pass computed (`Round`: its per-layer states, the acceptance of each row's drafts, the cache) and may change its
layers, the next round's K (0: a plain decoding step) and its confidence stop (`Policy.stop_below`). The verify
pass keeps its states only for such a draft, so for every other draft the hook costs nothing; its time is its own
phase ("adapt"), part of the round (the first call, after the prompt, part of the first round). A round whose
layers are an early exit at E resumes at E as above; the states below E handed over are then the draft passes'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skipbench.engine.cache import resolve_kv_mode
from skipbench.engine.decode import Clock, Generation, Sampling, distribution, draw, eos_ids, pad_id, start
from skipbench.engine.forward import DraftHead, Engine
from skipbench.engine.protocol import Policy, Round, moved
from skipbench.errors import SkipbenchError
from skipbench.models.loading import LoadedModel


PROMPT_WINDOW = 32  # the prompt tokens an adapting draft first learns from (DEL seeds its estimates from 32)


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """How to speculate: K draft tokens per round (the first round's with `adaptive`), a confidence threshold
    below which a row's draft stops (0: never), the largest K adaptation may reach, and the draft's vocabulary
    (`draft_vocab` N > 0: its head scores only the N most frequent tokens, FR-Spec; 0: every token)."""

    k: int = 4
    adaptive: bool = False
    threshold: float = 0.0
    k_max: int = 16
    draft_vocab: int = 0

    def __post_init__(self) -> None:
        if self.draft_vocab < 0:
            raise SkipbenchError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        if not 1 <= self.k <= self.k_max:
            raise SkipbenchError(f"--speculate must be between 1 and {self.k_max} (or 'auto'), got {self.k}")
        if not 0 <= self.threshold <= 1:
            raise SkipbenchError(f"--draft-threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def parse(cls, text: str, threshold: float = 0.0, draft_vocab: int = 0) -> "Speculation":
        """`4` (K tokens per round) or `auto` (K adapted between rounds, from 4)."""
        if str(text).strip().lower() == "auto":
            return cls(k=4, adaptive=True, threshold=threshold, draft_vocab=draft_vocab)
        try:
            return cls(k=int(text), threshold=threshold, draft_vocab=draft_vocab)
        except ValueError:
            raise SkipbenchError(f"--speculate takes a number of draft tokens or 'auto', got '{text}'") from None

    @property
    def label(self) -> str:
        return (("auto" if self.adaptive else str(self.k)) + (f"@{self.threshold:g}" if self.threshold else "")
                + (f"/v{self.draft_vocab}" if self.draft_vocab else ""))


@dataclass
class SpecStats:
    """What one speculative generation did, per row and per round."""

    drafted: list[int]  # per row: draft tokens proposed to the verifier (those after a rejection included)
    accepted: list[int]  # per row: of those, accepted
    rejections: list[int]  # per row: rounds that ended at a rejected draft token
    rounds: list[int]  # per row: rounds it took part in
    layer_passes: list[int] = field(default_factory=list)  # per row: decoder layers run for it after the prompt,
    # drafting and verifying (what the output cost; plain decoding runs L per token fed back)
    round_k: list[int] = field(default_factory=list)  # per round: the K it drafted with (the most any row drafted)
    exit_layer: int | None = None  # an early-exit draft's E (its K/V below E were kept)

    def acceptance_rate(self, row: int | None = None) -> float:
        """Accepted draft tokens over drafted ones (what other tools report)."""
        a, d = (sum(self.accepted), sum(self.drafted)) if row is None else (self.accepted[row], self.drafted[row])
        return a / d if d else float("nan")

    def acceptance_prob(self, row: int | None = None) -> float:
        """The per-token acceptance probability of the standard model (each draft token accepted with probability
        alpha given the ones before it were): accepted / (accepted + rejections), its maximum-likelihood estimate."""
        a, r = (sum(self.accepted), sum(self.rejections)) if row is None else (self.accepted[row], self.rejections[row])
        return a / (a + r) if a + r else float("nan")

    def accepted_per_round(self, row: int | None = None) -> float:
        a, n = (sum(self.accepted), sum(self.rounds)) if row is None else (self.accepted[row], self.rounds[row])
        return a / n if n else float("nan")

    def row(self, r: int) -> dict:
        return {"drafted": self.drafted[r], "accepted": self.accepted[r], "rejections": self.rejections[r],
                "rounds": self.rounds[r], "acceptance_rate": self.acceptance_rate(r), "acceptance_prob": self.acceptance_prob(r),
                "accepted_per_round": self.accepted_per_round(r), "layer_passes": self.layer_passes[r]}

    def expected_per_round(self) -> float:
        """The standard model's tokens per round at this run's acceptance probability (alpha), averaged over its rounds' K."""
        ks = self.round_k or [0]
        return sum(expected_tokens(self.acceptance_prob(), k) for k in ks) / len(ks)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields on average when each of k draft tokens is accepted with probability alpha given
    the ones before (Leviathan et al., 2023, Eq. 1): (1 - alpha^(k+1)) / (1 - alpha)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def sample_rule(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, count: torch.Tensor,
                gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al., 2023, Algorithm 1; Chen et al., 2023): p [B, m+1, V] the verifier's
    distributions after each prefix, q [B, m, V] the draft's, drafts [B, m] the tokens drawn from q, count [B] how
    many of them each row proposed. Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
    rejection the token is drawn from the normalised max(p_j - q_j, 0); when a row's every proposal is accepted, a
    bonus token from p after them. Returns (accepted per row, the token that follows them)."""
    batch, m = drafts.shape
    rows = torch.arange(batch, device=p.device)
    if m == 0:
        return torch.zeros(batch, dtype=torch.long, device=p.device), draw(p[:, 0], gen)
    d = drafts[..., None]
    u = torch.rand(batch, m, generator=gen, device=p.device)
    judged = torch.arange(m, device=p.device)[None, :] < count[:, None]
    ok = (u * q.gather(-1, d)[..., 0] < p[:, :m].gather(-1, d)[..., 0]) & judged  # u < p/q, u in [0, 1)
    n = ok.long().cumprod(1).sum(1)
    rejected = (n < count)[:, None]
    residual = (p[rows, n] - q[rows, n.clamp(max=m - 1)] * rejected).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return n, draw(torch.where(mass > 0, residual, p[rows, n]), gen)


def exit_layer(draft: Policy, num_layers: int) -> int | None:
    """E when the draft runs exactly layers 0 .. E-1 for every token (an early exit), else None."""
    layers = draft.executed_layers()
    if layers and len(layers) < num_layers and layers == list(range(len(layers))):
        return len(layers)
    return None


@torch.no_grad()
def speculate(
    lm: LoadedModel,
    prompts: list[list[int]],
    draft: Policy,
    spec: Speculation = Speculation(),
    max_new_tokens: int = 64,
    kv_mode: str = "auto",
    sampling: Sampling = Sampling(),
    row_keys: list[int] | None = None,
    stop_at_eos: bool = True,
    impl: str = "auto",
    timings: list | None = None,
    propose=None,
    vocab: torch.Tensor | None = None,
) -> Generation:
    """Generate with `draft` proposing and the full model verifying (module docstring): greedy output equals
    `generate(lm, prompts, None)` token for token; sampled output follows the full model's distribution.

    kv_mode: the draft's KV mode (the verifier writes every layer). timings: when a list, receives ("prefill", s),
    then per round one ("draft", s) per draft forward, ("verify", s) for the verify pass, ("accept", s) for the
    acceptance and roll-back, and for a draft that `adapts` ("adapt", s) for its `after_round`. Greedy output equals plain decoding's in exact arithmetic (module docstring).
    propose(tokens [B]) -> tokens [B]: replaces the draft's token choice (tests use it
    to make a draft that is never right); it applies to greedy decoding only.
    vocab: the draft head's token ids when `spec.draft_vocab` is set (policies.calibration.frequent_tokens); the
    draft proposes only these, scored by their rows of the head alone (engine.forward.DraftHead).
    """
    if spec.draft_vocab and (vocab is None or len(vocab) != spec.draft_vocab):
        raise SkipbenchError(f"--draft-vocab {spec.draft_vocab} needs its {spec.draft_vocab} token ids")
    kv_mode = resolve_kv_mode(kv_mode, draft.kv_mode, f"draft '{draft.describe()}'")
    if draft.lm is not None:
        raise SkipbenchError(f"draft '{draft.describe()}' runs on weights of its own (a collapsed model), so it cannot "
                             "share the full model's cache: self-speculative drafts skip layers of the full model")
    if propose is not None and sampling.temperature > 0:
        raise SkipbenchError("propose replaces greedy draft tokens only")
    if draft.adapts and getattr(lm.adapter, "compiled", False):
        raise SkipbenchError(f"draft '{draft.describe()}' changes its layers between rounds, and under --compile each "
                             "new layer set would compile inside the timed rounds: run it without --compile")
    num_layers, dev = lm.num_layers, lm.device
    verifier = Engine(lm.adapter, kv_mode, impl)
    ids, present, cache = start(lm, verifier, prompts, max_new_tokens, max_new_tokens + spec.k_max + 1)
    batch = ids.shape[0]
    draft.begin(batch, row_keys)
    draft.lengths([len(p) for p in prompts], max_new_tokens)
    adapts = draft.adapts  # the verify pass keeps its states for `after_round`, which may change the draft's layers
    # a draft that runs the same layers for every token never reads a skipped layer's K/V at its own positions
    uniform = draft.executed_layers() is not None or draft.plans_sublayers
    drafter = Engine(lm.adapter, kv_mode, impl, write_skipped=not uniform, drafts=True,
                     head=DraftHead(lm.adapter, vocab) if spec.draft_vocab else None)
    stops = torch.tensor(sorted(eos_ids(lm)) if stop_at_eos else [], dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    greedy = sampling.temperature == 0
    fill = pad_id(lm)

    clock = Clock(dev) if timings is not None else None
    out = verifier.forward(ids, cache, None, present=present, last_only=True, keep_hidden=adapts)
    first = out.logits[:, -1].argmax(-1) if greedy else draw(distribution(out.logits[:, -1], sampling), gen)
    tokens: list[list[int]] = [[t] for t in first.tolist()]
    stop_set = set(stops.tolist())
    done = [t in stop_set or max_new_tokens == 1 for t in first.tolist()]
    pending = first
    # an early exit's verify pass resumes at E (module docstring); an adapting draft's E may change between rounds
    stats = SpecStats([0] * batch, [0] * batch, [0] * batch, [0] * batch, [0] * batch,
                      exit_layer=None if adapts else exit_layer(draft, num_layers))
    if clock is not None:
        timings.append(("prefill", clock.lap()))
    k = spec.k
    if adapts:  # the prompt's pass verified its tokens: a first round of nothing drafted (CLaSp's "prefill & update",
        # DEL's estimates seeded from the prompt) over its last PROMPT_WINDOW tokens, timed as the first round's "adapt"
        w = min(PROMPT_WINDOW, min(len(p) for p in prompts))
        nothing = torch.zeros(batch, dtype=torch.long, device=dev)
        asked = draft.after_round(Round(
            hidden=[h[:, -w:] for h in out.hidden], drafted=nothing, accepted=nothing + w - 1, live=nothing == 0,
            positions=(ids.shape[1] - w + torch.arange(w, device=dev))[None, :] - cache.pad[:, None],
            start=ids.shape[1] - w, context=cache.length, k=0, cache=cache))
        k = k if asked is None else max(0, min(spec.k_max, int(asked)))
        if clock is not None:
            timings.append(("adapt", clock.lap()))
    steps = torch.arange(spec.k_max, device=dev)
    while not all(done):
        exit_at = exit_layer(draft, num_layers)  # this round's (an adapting draft may change its layers)
        threshold = spec.threshold if draft.stop_below is None else draft.stop_below
        # 1. draft: each live row up to its limit (K, and never past the tokens it still needs)
        limit = torch.tensor([0 if d else min(k, max_new_tokens - len(t) - 1) for d, t in zip(done, tokens)], device=dev)
        rounds_k = int(limit.max())
        start_len = cache.length
        cache.reserve(start_len + rounds_k + 1)
        drafting = limit > 0
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        drafts, q_probs, states, below = [], [], [], []
        passes = torch.zeros(batch, dtype=torch.long, device=dev)
        tok = pending
        for j in range(rounds_k):
            o = drafter.forward(tok[:, None], cache, draft, keep_hidden=exit_at is not None, record=True)
            passes += o.executed[:, 0].sum(-1) * drafting  # rows no longer drafting run along, uncounted
            logits = o.logits[:, -1]
            if greedy:
                tok = logits.argmax(-1) if propose is None else propose(logits.argmax(-1))
                conf = torch.softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0] if threshold else None
            else:
                q = distribution(logits, sampling)
                tok = draw(q, gen)
                q_probs.append(q)
                conf = q.gather(-1, tok[:, None])[:, 0]
            if exit_at is not None:
                states.append(o.hidden[exit_at])
                if adapts:
                    below.append(o.hidden[:exit_at])
            drafts.append(tok)
            count += drafting.long()
            stop = (j + 1 >= limit) | torch.isin(tok, stops)
            if threshold:
                stop |= conf < threshold
            drafting &= ~stop
            if clock is not None:
                timings.append(("draft", clock.lap()))
            if not bool(drafting.any()):
                break
        m = len(drafts)

        # 2. verify: the full model over [pending, d1 .. dm] at the draft's positions
        cache.length = start_len
        seq = torch.stack([pending, *drafts], 1)
        positions = cache.positions(m + 1) if adapts else None
        if exit_at is not None and m:
            cache.length = start_len + m  # the last draft token was never fed: layers below E first
            lower = verifier.forward(seq[:, -1:], cache, None, span=range(exit_at), keep_hidden=adapts)
            cache.length = start_len
            o = verifier.forward(seq, cache, None, span=range(exit_at, num_layers), keep_hidden=adapts,
                                 states=torch.cat([*states, moved(lower.state, states[0].device)], 1))
            if adapts:  # below E, the states the draft computed (the full model's there), then the verify pass's
                o.hidden = [torch.cat([*(b[i] for b in below), lower.hidden[i]], 1) for i in range(exit_at)] + o.hidden
        else:
            o = verifier.forward(seq, cache, None, keep_hidden=adapts)
        logits = o.logits  # [B, m + 1, V]
        if clock is not None:
            timings.append(("verify", clock.lap()))

        # 3. accept
        if greedy:
            judged = steps[:m][None, :] < count[:, None]  # [B, m] the drafts each row proposed
            v = logits.argmax(-1)
            ok = (seq[:, 1:] == v[:, :m]) & judged
            n = ok.long().cumprod(1).sum(1)
            nxt = v.gather(1, n[:, None])[:, 0]
        else:
            q = torch.stack(q_probs, 1) if m else None
            n, nxt = sample_rule(distribution(logits, sampling), q, seq[:, 1:], count, gen)

        # 4. keep each row's accepted run, roll the rest back, hand over the next token; count the verify pass's
        # layers: >= E for the tokens an early-exit draft fed, every layer for its last token (or for all of them)
        verified = (m + 1) * num_layers if exit_at is None or not m else (m + 1) * (num_layers - exit_at) + exit_at
        pass_list = (passes + verified).tolist()
        n_list, nxt_list, cnt = n.tolist(), nxt.tolist(), count.tolist()
        d_rows = seq[:, 1:].tolist()
        keep = []
        for r in range(batch):
            if done[r]:  # finished before this round: its positions here are holes
                keep.append(0)
                continue
            stats.rounds[r] += 1
            stats.drafted[r] += cnt[r]
            stats.accepted[r] += n_list[r]
            stats.rejections[r] += int(n_list[r] < cnt[r])
            stats.layer_passes[r] += pass_list[r]
            for t in d_rows[r][: n_list[r]] + [nxt_list[r]]:
                tokens[r].append(t)
                if t in stop_set or len(tokens[r]) >= max_new_tokens:
                    done[r] = True
                    break
            keep.append(n_list[r] + 1)
        longest = max(keep)
        cache.drop(start_len, torch.tensor(keep, device=dev), start_len + longest)
        pending = torch.where(torch.tensor(done, device=dev), torch.full_like(nxt, fill), nxt)
        stats.round_k.append(m)
        if clock is not None:
            timings.append(("accept", clock.lap()))
        asked = None
        if adapts and not all(done):  # 5. the draft's own step (`after_round`) for the next round, timed apart
            asked = draft.after_round(Round(
                hidden=o.hidden, positions=positions, drafted=count, accepted=n, start=start_len, context=cache.length,
                k=m, live=torch.tensor([bool(x) for x in keep], device=dev), cache=cache))
            if clock is not None:
                timings.append(("adapt", clock.lap()))
        if asked is not None:  # the draft sets the next K (within 0 .. k_max; 0: a plain decoding step)
            k = max(0, min(spec.k_max, int(asked)))
        elif spec.adaptive:
            live = [r for r in range(batch) if keep[r] and cnt[r]]
            all_in = bool(live) and all(n_list[r] == cnt[r] for r in live)
            k = min(spec.k_max, k + 2) if all_in else max(1, k - 1)

    full = list(range(num_layers))
    return Generation(tokens=tokens, layers=[[full] * (len(t) - 1) for t in tokens],
                      prompt_tokens=[len(p) for p in prompts], kv_mode=kv_mode, speculation=stats, cache=cache)

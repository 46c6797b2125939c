"""The per-round draft hook (Policy.adapts / after_round) and CLaSp, the draft that uses it (policies/clasp.py).

Greedy output equals full depth for CLaSp with the other drafts in tests/test_speculative.py; here: the hook's
contents and its control of K, that it costs nothing unused, `Engine.probe` against a real forward, CLaSp's search
on a model with planted identity layers, its layer set changing between rounds, and its refusal as a plain policy.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.engine.forward import Engine
from skipbench.engine.speculative import PROMPT_WINDOW, Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.policies import parse_policies
from skipbench.policies.static import PlanPolicy

NEW = 20


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request, tokenizer):
    return wrap_model(tiny_model(request.param, len(tokenizer)), tokenizer, f"tiny-{request.param}")


def clasp(lm, cost: int = 3, interval: int = 1):
    (spec,) = parse_policies(f"clasp:{cost}", {"interval": str(interval)})
    return spec.build(lm.num_layers, lm, draft=True)


class Recorder(PlanPolicy):
    """A plan that adapts: records what each round handed it, and asks for the K of `ks` in turn."""

    adapts = True

    def __init__(self, num_layers, layers, ks=()):
        super().__init__(num_layers, layers, "recorder")
        self.rounds, self.ks = [], list(ks)

    def after_round(self, done):
        self.rounds.append(done)
        return self.ks.pop(0) if self.ks else None


@pytest.mark.parametrize("batch", [1, 4])
def test_the_hook_hands_each_round_what_its_verify_pass_computed_and_may_set_k(lm, tokenizer, batch):
    ps = prompts(tokenizer, 4)[:batch]
    ref = generate(lm, ps, None, NEW)
    rec = Recorder(lm.num_layers, [0, 1, 3], ks=[1, 2, 3, 1, 2, 3])
    out = speculate(lm, ps, rec, Speculation(k=4), NEW)
    assert out.tokens == ref.tokens
    s = out.speculation
    first, rounds = rec.rounds[0], rec.rounds[1:]
    # after the prompt: its last w tokens (all kept), nothing drafted
    w = min(PROMPT_WINDOW, min(len(p) for p in ps))
    assert first.k == 0 and int(first.drafted.sum()) == 0 and first.accepted.tolist() == [w - 1] * batch
    assert all(h.shape[:2] == (batch, w) for h in first.hidden) and first.start + w == max(len(p) for p in ps)
    assert first.positions[:, -1].tolist() == [len(p) - 1 for p in ps]  # each row's last prompt token
    assert len(rounds) == len(s.round_k) - 1 and [r.k for r in rounds] == s.round_k[:-1]  # none after the last
    assert s.round_k[:5] == [1, 2, 3, 1, 2]  # the K each call asked for (the first round drafts the K it had)
    for r in rounds:
        assert len(r.hidden) == lm.num_layers + 1 and all(h.shape[:2] == (batch, r.k + 1) for h in r.hidden)
        assert r.positions.shape == (batch, r.k + 1)
        if batch == 1:  # no padding and no holes: the positions are the cache indices
            assert r.positions[0].tolist() == list(range(r.start, r.start + r.k + 1))
        assert bool(((r.accepted <= r.drafted) & (r.drafted <= r.k)).all())
        assert r.context == r.start + int(r.accepted[r.live].max()) + 1  # past the longest kept run
    totals = [sum(int(r.accepted[i]) for r in rounds) for i in range(batch)]
    # the rounds' acceptance is the run's, but for the last round's, which is not handed over (no round follows it)
    assert all(0 <= a - t <= s.round_k[-1] for t, a in zip(totals, s.accepted))


def test_the_hook_costs_nothing_unused(lm, tokenizer, monkeypatch):
    """A draft that does not adapt is never called back, and no verify pass keeps its states."""
    kept = []
    run = Engine.run

    def spy(self, *args, **kw):
        kept.append(kw.get("keep_hidden", False))
        return run(self, *args, **kw)

    monkeypatch.setattr(Engine, "run", spy)
    rec = Recorder(lm.num_layers, [0, 1, 3])
    rec.adapts = False
    speculate(lm, prompts(tokenizer, 2), rec, Speculation(k=3), NEW)
    assert rec.rounds == [] and kept and not any(kept)


def test_probe_runs_a_layer_as_the_forward_pass_does(lm, tokenizer):
    """A layer probed on the verify pass's own state of the last kept token gives its state after the layer,
    for every row and layer (the cache read, the mask and the position ids are the forward pass's); the prompt's
    round too; and the cache is left as it was."""
    ps = prompts(tokenizer, 3)
    rec = Recorder(lm.num_layers, [0, 2])
    speculate(lm, ps, rec, Speculation(k=3), NEW)
    engine, ad = Engine(lm.adapter), lm.adapter
    before = [t.clone() for t in rec.rounds[0].cache.k + rec.rounds[0].cache.v]
    for done in rec.rounds[:4]:
        rows = done.live.nonzero()[:, 0]
        last = done.accepted[rows]
        index = done.start + last
        for i in range(lm.num_layers):
            h = done.hidden[i][rows, last][:, None]
            pos = ad.position_embeddings(h, done.positions[rows, last][:, None])
            got = engine.probe(i, h, pos, done.cache, rows, index)
            assert torch.allclose(got[:, 0], done.hidden[i + 1][rows, last], atol=1e-5), i
    assert all(torch.equal(a, b) for a, b in zip(before, rec.rounds[0].cache.k + rec.rounds[0].cache.v))


def test_probe_uses_the_candidates_own_key_and_value(tokenizer):
    """A candidate state that is not the cached token's: probe == the forward pass run from that state at the
    token's index (its K/V written there, a copy of the cache), so the probe attends to its own K/V, not the slot's."""
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    rec = Recorder(lm.num_layers, [0, 2])
    speculate(lm, prompts(tokenizer, 1), rec, Speculation(k=3), NEW)
    done, engine, ad = rec.rounds[2], Engine(lm.adapter), lm.adapter
    last = int(done.accepted[0])
    index = done.start + last
    for i in range(1, lm.num_layers - 1):
        h = done.hidden[i - 1][:, last:last + 1]  # the state one layer early: another candidate
        pos = ad.position_embeddings(h, done.positions[:, last:last + 1])
        got = engine.probe(i, h, pos, done.cache, torch.tensor([0]), torch.tensor([index]))
        copy = done.cache.clone()
        copy.length = index
        ref = engine.run(torch.zeros(1, 1, dtype=torch.long), copy, None, span=range(i, i + 1), states=h).state
        assert torch.allclose(got, ref, atol=1e-5), i
        assert not torch.allclose(got, done.hidden[i + 1][:, last:last + 1], atol=1e-3)  # it is another state


def identity_layers(model, layers):
    """Layers whose attention output and MLP output projections are zero: each is exactly the identity."""
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_clasp_skips_planted_identity_layers(tokenizer):
    """Layers 2 and 4 of 6 are the identity: skipping them keeps every state exactly, so the search skips them."""
    lm = wrap_model(identity_layers(tiny_model("llama", len(tokenizer)), [2, 4]), tokenizer, "tiny-identity")
    draft = clasp(lm, cost=4)
    ps = prompts(tokenizer, 2)
    out = speculate(lm, ps, draft, Speculation(k=3), NEW)
    assert out.tokens == generate(lm, ps, None, NEW).tokens
    assert set(draft.searches) == {(0, 1, 3, 5)}  # every search, prompt and rounds alike
    assert out.speculation.acceptance_rate() == 1.0  # the draft is the model


def test_clasp_chooses_its_layers_again_between_rounds(lm, tokenizer):
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, 40)
    every = clasp(lm, cost=3, interval=1)
    out = speculate(lm, ps[:1], every, Speculation(k=3), 40)
    assert out.tokens == ref.tokens[:1]
    rounds = len(out.speculation.round_k)
    assert len(every.searches) == rounds  # after the prompt and after every round but the last (none follows it)
    assert all(len(s) == 3 for s in every.searches) and len(set(every.searches)) > 1  # it adapts
    sparse = clasp(lm, cost=3, interval=4)
    rounds = len(speculate(lm, ps[:1], sparse, Speculation(k=3), 40).speculation.round_k)
    assert len(sparse.searches) == -(-rounds // 4)  # after the prompt, then before every 4th round


def test_clasp_is_a_draft_only_and_its_options_are_checked(lm, tokenizer, tiny_dirs, tmp_path):
    with pytest.raises(SkipbenchError, match="give it as a draft"):  # built as a policy
        parse_policies("clasp:3")[0].build(lm.num_layers, lm)
    with pytest.raises(SkipbenchError, match="give it as a draft"):  # the engine's own check, behind it
        generate(lm, prompts(tokenizer, 1), clasp(lm), NEW)
    for command in (["evaluate", "--dataset", "text", "--split", "test", "--limit", "2", "--out", str(tmp_path / "e.parquet")],
                    ["cosine", "--dataset", "text", "--split", "test", "--limit", "2", "--out", str(tmp_path / "c.parquet")]):
        res = CliRunner().invoke(app, [command[0], "--model", str(tiny_dirs["llama"]), "--policy", "full,clasp:3"
                                       if command[0] == "evaluate" else "clasp:3", *command[1:]])
        assert res.exit_code == 1 and "give it as a draft" in res.stderr, res.output
        assert not list(tmp_path.glob("*.parquet"))  # refused before any work
    for bad, message in (("clasp:6", "runs 1 to 5 layers"), ("clasp:0", "the cost must be between 1 and 6")):
        with pytest.raises(SkipbenchError, match=message):
            clasp(lm, cost=int(bad.split(":")[1]))
    with pytest.raises(SkipbenchError, match="interval must be >= 1"):
        clasp(lm, interval=0)
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dirs["llama"]), "--policy", "clasp:3", "--prompt", "Hi",
                                   "--max-new-tokens", "4"])
    assert res.exit_code == 1 and "give it as a draft" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dirs["llama"]), "--draft", "clasp:3", "--speculate", "3",
                                   "--prompt", "Hi", "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output


def test_bench_times_the_adapting_drafts_own_step_as_part_of_its_rounds(tiny_dirs, tmp_path):
    import pandas as pd

    out = tmp_path / "b.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--policy", "full", "--draft", "clasp:3",
                                   "-o", "interval=1", "--batch-sizes", "1", "--max-new-tokens", "12", "--repeats", "1",
                                   "--warmup", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = pd.read_parquet(out)
    spec = d[(d["kind"] == "speculative") & (d["phase"] == "decode")]
    assert len(spec) == 1 and spec["adapt_share"].iloc[0] > 0 and spec["draft_spec"].iloc[0].startswith("clasp")
    shares = spec[["draft_share", "verify_share", "accept_share", "adapt_share"]].iloc[0]
    assert shares.sum() == pytest.approx(1.0) and "adapt %" in res.stdout


@pytest.mark.parametrize("draft", ["del", "knapspec"])
def test_bench_times_the_other_adapting_drafts_too(tiny_dirs, tmp_path, monkeypatch, draft):
    """DEL and KnapSpec in bench: rounds that may draft nothing (K = 0) and sub-layer plans time like any draft."""
    import pandas as pd

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["opt"]), "--policy", "full", "--draft", draft,
                                   "--batch-sizes", "1,2", "--max-new-tokens", "12", "--repeats", "1", "--warmup", "0",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = pd.read_parquet(out)
    spec = d[(d["kind"] == "speculative") & (d["phase"] == "decode")]
    assert len(spec) == 2 and (spec["adapt_share"] > 0).all() and (spec["draft_spec"] == draft).all()


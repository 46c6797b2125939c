"""Self-speculative decoding (engine/speculative.py): any policy drafts, the full model verifies.

Greedy output equals plain full-depth decoding token for token, for every kind of draft, at batch 1 and 4 with
prompts of different lengths, in both KV modes; sampled output follows the full model's distribution; the cache
after rejections holds exactly plain decoding's K/V.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import prompts, tiny_model
from skipbench.engine import generate
from skipbench.engine.decode import Sampling, distribution
from skipbench.engine.speculative import Speculation, expected_tokens, exit_layer, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.models.loading import remove_layers
from skipbench.policies import make_policy, parse_policies

NEW = 20


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request, tokenizer, device):
    return wrap_model(tiny_model(request.param, len(tokenizer)), tokenizer, f"tiny-{request.param}", device)


def draft(name: str, lm, kv_mode: str, tmp_path, monkeypatch):
    """Every kind of policy the registry has: static plans, per-sequence and per-token draws, a threshold policy,
    calibrated plans, the two learned kinds (untrained, with gates that skip some tokens) and CLaSp, which chooses
    its layers again after every round."""
    if name == "controller":
        from skipbench.policies.controller import ControllerPolicy, Controllers

        torch.manual_seed(0)
        return ControllerPolicy(Controllers(64, lm.num_layers, init_execute=0.0), gate="sample", seed=1)
    if name == "flexidepth":
        from skipbench.policies.flexidepth import FlexiDepth, FlexiPolicy

        torch.manual_seed(0)
        flexi = FlexiDepth(64, lm.num_layers, reduction=4, kv=kv_mode == "fill")
        with torch.no_grad():
            for r in flexi.routers.values():
                r.out.bias.fill_(0.0)  # some tokens skip
        return FlexiPolicy(flexi)
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    options = ({"calibration": "3", "calibration-tokens": "32"} if "influence" in name
               else {"interval": "1"} if name.startswith("clasp") else None)  # CLaSp: a layer search every round
    (spec,) = parse_policies(name, options, seed=1)
    return spec.build(lm.num_layers, lm, draft=True)


DRAFTS = ["full", "early-exit:3", "uniform:4", "layers:0,2,5", "random:3", "random-token:4", "confidence:0.005",
          "block-influence:3", "controller", "flexidepth", "clasp:3"]


@pytest.mark.lane
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("name", DRAFTS)
def test_greedy_output_is_the_full_models_for_every_draft(lm, tokenizer, name, kv_mode, tmp_path, monkeypatch):
    ps = prompts(tokenizer, 4)  # 4 different lengths
    assert len({len(p) for p in ps}) == 4
    ref = generate(lm, ps, None, NEW)
    for batch in (1, 4):
        policy = draft(name, lm, kv_mode, tmp_path, monkeypatch)
        out = speculate(lm, ps[:batch], policy, Speculation(k=3), NEW, kv_mode)
        assert out.tokens == ref.tokens[:batch], (name, kv_mode, batch)
        s = out.speculation
        assert sum(s.drafted) > 0 and all(0 <= a <= d for a, d in zip(s.accepted, s.drafted))
    if name != "full":  # rejections were rolled back, and rows that accepted fewer than others left holes
        assert sum(s.rejections) > 0
        left_padding = torch.tensor([max(map(len, ps)) - len(p) for p in ps])
        assert bool((out.cache.pad.cpu() > left_padding).any())
    if name == "full":  # a draft identical to the full model: everything is accepted
        assert s.acceptance_rate() == 1.0 and s.acceptance_prob() == 1.0 and sum(s.rejections) == 0
        assert s.rounds == [int(np.ceil((len(t) - 1) / 4)) for t in out.tokens]


@pytest.mark.parametrize("spec", [Speculation(k=2, adaptive=True), Speculation(k=5, threshold=0.6), Speculation(k=1)])
def test_adaptive_k_and_threshold_keep_the_output(lm, tokenizer, spec):
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, NEW)
    out = speculate(lm, ps, make_policy("uniform:4", lm.num_layers), spec, NEW)
    assert out.tokens == ref.tokens
    ks = out.speculation.round_k
    if spec.adaptive:  # K moved away from its start before the last rounds (which draft less to end on time)
        assert set(ks[:-3]) - {spec.k}
    if spec.threshold:  # rows stop drafting when unsure: fewer drafts than the same run without a threshold
        plain = speculate(lm, ps, make_policy("uniform:4", lm.num_layers), Speculation(k=spec.k), NEW)
        assert sum(out.speculation.drafted) < sum(plain.speculation.drafted)


def test_the_cache_grows_when_holes_use_up_its_room(lm, tokenizer):
    """The cache has room for K_max + 1 positions beyond the new tokens. Row 0's drafts are made wrong while the
    others accept everything, so row 0 leaves K holes a round; the cache grows (copied, the `fill` mode's shared
    validity kept) and the output stays full depth's."""
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, NEW)
    vocab = lm.model.config.vocab_size
    wrong_in_row_0 = lambda t: (t + (torch.arange(len(t)) == 0).long()) % vocab  # noqa: E731
    out = speculate(lm, ps, make_policy("full", lm.num_layers), Speculation(k=2, k_max=2), NEW,
                    propose=wrong_in_row_0)
    assert out.tokens == ref.tokens
    assert out.speculation.accepted[0] == 0 and min(out.speculation.accepted[1:]) > 0
    assert out.cache.capacity > max(map(len, ps)) + NEW + 3  # grew
    assert len({id(v) for v in out.cache.valid}) == 1


@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_draft_that_is_never_right_accepts_nothing_and_changes_nothing(lm, tokenizer, kv_mode, batch):
    ps = prompts(tokenizer, 4)[:batch]
    ref = generate(lm, ps, None, NEW)
    vocab = lm.model.config.vocab_size
    out = speculate(lm, ps, make_policy("uniform:4", lm.num_layers), Speculation(k=3), NEW, kv_mode,
                    propose=lambda t: (t + 1) % vocab)
    assert out.tokens == ref.tokens
    s = out.speculation
    assert sum(s.accepted) == 0 and s.acceptance_rate() == 0.0
    assert s.rejections == [n - 1 for n in s.rounds] and s.round_k[-1] == 0  # the last round had one token to make
    assert s.rounds == [len(t) - 1 for t in out.tokens]  # one token per round, the verifier's


@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("name", ["early-exit:3", "uniform:4", "random-token:4"])
def test_the_cache_after_rejections_is_plain_decodings(lm, tokenizer, name, kv_mode):
    """Every valid position holds the K/V plain full-depth decoding wrote for the same token, at every layer (for
    early-exit drafts, those below the exit are the draft's own); the holes rejected tokens left are invalid."""
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, NEW, kv_mode=kv_mode, stop_at_eos=False)
    out = speculate(lm, ps, make_policy(name, lm.num_layers, seed=1), Speculation(k=3), NEW, kv_mode,
                    stop_at_eos=False)
    assert out.tokens == ref.tokens
    assert sum(out.speculation.rejections) > 0  # rollbacks happened
    a, b = ref.cache, out.cache
    for r in range(len(ps)):
        for i in range(lm.num_layers):
            va, vb = a.valid[i][r, : a.length], b.valid[i][r, : b.length]
            assert int(va.sum()) == int(vb.sum()) == len(ps[r]) + NEW - 1
            torch.testing.assert_close(b.k[i][r][:, : b.length][:, vb], a.k[i][r][:, : a.length][:, va], atol=1e-5, rtol=0)
            torch.testing.assert_close(b.v[i][r][:, : b.length][:, vb], a.v[i][r][:, : a.length][:, va], atol=1e-5, rtol=0)
    if len(ps) > 1:
        assert bool((~b.valid[0][:, b.pad.max():b.length]).any())  # some row has holes


@pytest.mark.parametrize("name,batch", [("uniform:4", 4), ("early-exit:3", 4), ("random:5", 1)])
def test_skipping_the_k_v_of_skipped_layers_changes_no_draft(lm, tokenizer, name, batch):
    """A draft that runs the same layers for every token computes no K/V for the layers it skips: its proposals
    (and so every count) are those of the same draft writing them, which a wrong choice would change."""
    from skipbench.engine.protocol import Policy

    class Writing(Policy):  # the same gates, but not known to run the same layers for every token
        static = False

        def __init__(self, inner):
            super().__init__(inner.num_layers)
            self.inner = inner

        def begin(self, batch_size, row_keys=None):
            self.inner.begin(batch_size, row_keys)

        def new_step(self, positions):
            self.inner.new_step(positions)

        def gate(self, layer, hidden):
            return self.inner.gate(layer, hidden)

    ps = prompts(tokenizer, 4)[:batch]
    a = speculate(lm, ps, make_policy(name, lm.num_layers, seed=1), Speculation(k=3), NEW).speculation
    b = speculate(lm, ps, Writing(make_policy(name, lm.num_layers, seed=1)), Speculation(k=3), NEW).speculation
    assert (a.drafted, a.accepted, a.round_k) == (b.drafted, b.accepted, b.round_k)
    assert sum(a.accepted) > 0


def test_layer_passes_count_every_draft_and_verify_layer(lm, tokenizer):
    """At batch 1: a full draft runs L layers per draft token and L per verified token; an early-exit draft E per
    draft token, then the verify pass L - E for the tokens it fed and L for its last one."""
    ps = prompts(tokenizer, 1)
    L = lm.num_layers
    full = speculate(lm, ps, make_policy("full", L), Speculation(k=3), NEW).speculation
    assert full.layer_passes == [sum(m * L + (m + 1) * L for m in full.round_k)]
    ee = speculate(lm, ps, make_policy("early-exit:3", L), Speculation(k=3), NEW).speculation
    assert ee.layer_passes == [sum(m * 3 + ((m + 1) * (L - 3) + 3 if m else L) for m in ee.round_k)]


def test_exit_layer_is_found_for_prefix_plans_only():
    assert exit_layer(make_policy("early-exit:3", 6), 6) == 3
    assert exit_layer(make_policy("layers:0,1", 6), 6) == 2
    assert exit_layer(make_policy("layers:0,2", 6), 6) is None
    assert exit_layer(make_policy("full", 6), 6) is None
    assert exit_layer(make_policy("random-token:3", 6), 6) is None
    seq = make_policy("random:3", 6, seed=1)
    seq.begin(2)
    assert exit_layer(seq, 6) is None  # two rows, two draws: not one plan
    seq.begin(1)
    assert seq.executed_layers() is not None  # one row: its plan (an exit only if it is a prefix)


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("text,threshold,message", [
    ("0", 0.0, "between 1 and 16"), ("many", 0.0, "number of draft tokens or 'auto'"), ("4", 1.5, "draft-threshold"),
])
def test_bad_speculation_settings_are_one_line_errors(text, threshold, message):
    with pytest.raises(SkipbenchError, match=message):
        Speculation.parse(text, threshold)


# sampling: a tiny vocabulary, so the joint distribution of two tokens has few cells


@pytest.fixture(scope="module")
def small():
    from types import SimpleNamespace

    model = tiny_model("llama", 6, layers=6, seed=3)
    with torch.no_grad():  # a flatter distribution: every token has some probability
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    return wrap_model(model, tok, "tiny-vocab-6")


def joint_probs(lm, prompt: list[int], first: int, sampling: Sampling) -> np.ndarray:
    """p(t1, t2 | prompt, t0=first) of the full model (temperature applied), by direct forwards."""
    V = lm.model.config.vocab_size
    with torch.no_grad():
        seqs = torch.tensor([prompt + [first, t1] for t1 in range(V)])
        logits = lm.model(seqs).logits
    p1 = distribution(logits[0, -2], sampling).numpy()
    p2 = distribution(logits[:, -1], sampling).numpy()
    return p1[:, None] * p2


@pytest.mark.parametrize("k,top_p", [(2, 1.0), (1, 1.0), (2, 0.8)])
def test_sampling_follows_the_full_models_distribution(small, k, top_p):
    """Chi-square of the first two speculative tokens against the full model's exact joint probabilities, at a fixed
    seed; the same test rejects the draft's own samples (it has the power to fail). K = 2: both tokens come from the
    first round's judged drafts or residual; K = 1: the second is the bonus token whenever the first draft is
    accepted; top-p < 1: both distributions truncated and renormalised."""
    lm, sampling, n = small, Sampling(temperature=1.0, top_p=top_p, seed=5), 3000
    prompt = [2, 3, 4, 5, 2]
    draft_policy = make_policy("early-exit:1", lm.num_layers)
    out = speculate(lm, [prompt] * n, draft_policy, Speculation(k=k), k + 2, "fill", sampling, stop_at_eos=False)
    plain = generate(lm, [prompt] * n, make_policy("early-exit:1", lm.num_layers), 4, "fill", sampling,
                     stop_at_eos=False)
    assert sum(out.speculation.accepted) > n // 10 and sum(out.speculation.rejections) > n // 10  # both paths taken
    assert chi2(lm, prompt, out, sampling) > 0.01
    assert chi2(lm, prompt, plain, sampling) < 1e-6  # the draft alone samples another distribution


def test_sampling_with_a_draft_that_adapts_follows_the_full_models_distribution(small):
    """CLaSp changes its layers after every round (-o interval=1): the tokens still follow the full model."""
    lm, sampling, n, prompt = small, Sampling(temperature=1.0, seed=5), 3000, [2, 3, 4, 5, 2]
    (spec,) = parse_policies("clasp:2", {"interval": "1"})
    out = speculate(lm, [prompt] * n, spec.build(lm.num_layers, lm, draft=True), Speculation(k=2), 4, "fill", sampling,
                    stop_at_eos=False)
    assert sum(out.speculation.accepted) > n // 10 and sum(out.speculation.rejections) > n // 10
    assert chi2(lm, prompt, out, sampling) > 0.01


def chi2(lm, prompt, gen, sampling) -> float:
    """p of a chi-square test of the first two sampled tokens after the first against the full model's joint."""
    V = lm.model.config.vocab_size
    expected = np.zeros((V, V))
    observed = np.zeros((V, V))
    cache = {}
    for toks in gen.tokens:
        t0 = toks[0]
        if t0 not in cache:
            cache[t0] = joint_probs(lm, prompt, t0, sampling)
        expected += cache[t0]
        observed[toks[1], toks[2]] += 1
    impossible = expected.flatten() == 0  # top-p removed them: the full model never samples them
    if observed.flatten()[impossible].sum() > 0:
        return 0.0
    keep = expected.flatten() >= 5  # cells too rare for the chi-square approximation are pooled
    e, o = expected.flatten()[keep], observed.flatten()[keep]
    if expected.flatten()[~keep].sum() > 0:
        e, o = np.append(e, expected.flatten()[~keep].sum()), np.append(o, observed.flatten()[~keep].sum())
    return stats.chisquare(o, e * o.sum() / e.sum()).pvalue  # float32 probabilities: renormalised



def test_the_first_draft_token_is_accepted_as_often_as_the_rule_says(small):
    """With 3 new tokens and K = 1, a row drafts once (after t0) and accepts that token with probability
    sum_x min(p(x | t0), q(x | t0)), q the draft's distribution (the physically smaller model's)."""
    lm, sampling, n = small, Sampling(temperature=1.0, seed=5), 3000
    prompt = [2, 3, 4, 5, 2]
    draft_policy = make_policy("early-exit:1", lm.num_layers)
    once = speculate(lm, [prompt] * n, draft_policy, Speculation(k=1), 3, "fill", sampling, stop_at_eos=False)
    assert set(once.speculation.drafted) == {1}
    V = lm.model.config.vocab_size
    after = torch.tensor([prompt + [t] for t in range(V)])
    with torch.no_grad():
        p = distribution(lm.model(after).logits[:, -1], sampling)
        removed = wrap_model(remove_layers(lm.model, [0]), lm.tokenizer, "exit-1")
        q = distribution(removed.model(after).logits[:, -1], sampling)
    rate = torch.minimum(p, q).sum(-1).numpy()
    expected = rate[[t[0] for t in once.tokens]].mean()
    observed = np.mean(once.speculation.accepted)
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (observed, expected)
    assert 0.05 < expected < 0.95  # neither extreme: the rule is exercised


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_the_sampling_rule_returns_the_targets_distribution(top_p):
    """sample_rule on one draft position with fixed p and q, over many rows: the first output token (the draft
    when accepted, else the residual draw) is distributed as p, the bonus token (when accepted) as p after it, and
    the draft is accepted with probability sum_x min(p, q); each within 0.01 of the exact values."""
    from skipbench.engine.speculative import sample_rule

    gen = torch.Generator().manual_seed(0)
    V, rows = 5, 400_000
    sampling = Sampling(temperature=1.0, top_p=top_p)
    p0 = distribution(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]), sampling)
    p1 = distribution(torch.tensor([0.0, 0.3, 1.5, -0.5, 0.2]), sampling)
    q0 = distribution(torch.tensor([0.0, 2.0, 0.5, 1.0, 0.0]), sampling)
    p = torch.stack([p0, p1])[None].expand(rows, 2, V)
    q = q0[None, None].expand(rows, 1, V)
    drafts = torch.multinomial(q0, rows, replacement=True, generator=gen)[:, None]
    n, nxt = sample_rule(p, q, drafts, torch.ones(rows, dtype=torch.long), gen)
    first = torch.where(n == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / rows
    assert (freq - p0).abs().max() < 0.01, (freq, p0)
    bonus = torch.bincount(nxt[n == 1], minlength=V).float() / int((n == 1).sum())
    assert (bonus - p1).abs().max() < 0.01
    assert float(n.float().mean()) == pytest.approx(float(torch.minimum(p0, q0).sum()), abs=0.01)


# the commands end to end on a tiny model


def _cli(*args):
    from typer.testing import CliRunner

    from skipbench.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_with_a_draft_prints_full_depths_tokens_and_acceptance(tiny_dirs):
    import json

    model = tiny_dirs["llama"]
    plain = _cli("generate", "--model", model, "--prompt", "Repeat the list", "--max-new-tokens", 16, "--json")
    drafted = _cli("generate", "--model", model, "--prompt", "Repeat the list", "--max-new-tokens", 16, "--json",
                   "--draft", "early-exit:3", "--speculate", "3")
    assert plain.exit_code == 0 and drafted.exit_code == 0, drafted.output
    a, b = json.loads(plain.stdout), json.loads(drafted.stdout)
    assert b["token_ids"] == a["token_ids"]
    sp = b["speculation"]
    assert sp["draft"] == "early-exit:3" and sp["exit_layer"] == 3 and sp["drafted"] >= sp["accepted"] >= 0
    assert sp["rounds"] == len(sp["round_k"])
    bad = _cli("generate", "--model", model, "--prompt", "x", "--policy", "uniform:3", "--draft", "early-exit:3")
    assert bad.exit_code == 1 and "--policy must be full" in bad.output and "Traceback" not in bad.output


def test_bench_with_drafts_reports_acceptance_shares_and_predicted_speedup(tiny_dirs, tmp_path):
    import json

    out = tmp_path / "b.parquet"
    res = _cli("bench", "--model", tiny_dirs["llama"], "--policy", "uniform:3", "--draft", "early-exit:3,uniform:4",
               "--speculate", "2,auto", "--draft-vocab", "0,16", "--batch-sizes", "1,2", "--max-new-tokens", 8,
               "--repeats", 1, "--warmup", 0, "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    spec = df[df["kind"] == "speculative"]
    assert set(spec["variant"]) == {f"spec {d} k={k}{v}" for d in ("early-exit:3", "uniform:4") for k in ("2", "auto")
                                    for v in ("", "/v16")}
    assert set(spec.loc[spec["phase"] == "decode", "draft_vocab"]) == {0, 16}
    assert spec["bound_fraction"].isna().all()  # a verify pass reads a weight once for several tokens: not given
    assert "full" in set(df["variant"])  # added: speculative speedups are over full depth
    dec = spec[spec["phase"] == "decode"]
    assert (dec["tokens"] == dec["batch_size"] * 7).all()
    assert ((dec["acceptance_rate"] >= 0) & (dec["acceptance_rate"] <= 1)).all()
    shares = dec[["draft_share", "verify_share", "accept_share"]].sum(axis=1)
    assert np.allclose(shares, 1.0)
    summary = pd.DataFrame(json.loads(out.with_suffix(".json").read_text())["summary"])
    s = summary[(summary["kind"] == "speculative") & (summary["phase"] == "decode")]
    assert s["predicted_speedup"].notna().all() and s["speedup"].notna().all()
    assert "self-speculative decoding" in res.stdout
    assert (tmp_path / "b-speculative.png").stat().st_size > 10_000


def test_bench_drafts_auto_searches_a_layer_set(tiny_dirs):
    res = _cli("bench", "--model", tiny_dirs["llama"], "--policy", "full", "--draft", "auto", "--speculate", 3,
               "--batch-sizes", 1, "--max-new-tokens", 6, "--repeats", 1, "--warmup", 0)
    assert res.exit_code == 0, res.output
    chosen = [line for line in res.output.splitlines() if line.startswith("chosen draft: layers:")]
    assert len(chosen) == 1
    assert f"spec {chosen[0].removeprefix('chosen draft: ')} k=3" in res.output  # then benchmarked like any draft


def test_draft_search_drops_one_layer_per_step_and_picks_the_best_prediction(tokenizer):
    from skipbench.evaluation.draft_search import search

    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    found = search(lm, prompts(tokenizer, 1)[0], k=3, items=2, tokens=8)
    assert found.path[0].layers == tuple(range(6)) and found.path[0].agreement == 1.0
    for a, b in zip(found.path, found.path[1:]):
        assert len(set(a.layers) - set(b.layers)) == 1 and set(b.layers) < set(a.layers) and 0 in b.layers
        assert 0 <= b.agreement <= 1 and b.t_draft > 0
    assert len(found.path[-1].layers) == 1  # down to L/4 (at least one layer)
    best = max(found.path[1:], key=lambda s: s.predicted_speedup)
    assert found.chosen == best.layers
    s = found.path[1]
    assert s.predicted_speedup == pytest.approx(expected_tokens(s.agreement, 3) * found.t_full / (3 * s.t_draft + found.t_verify))


def test_evaluate_with_a_draft_adds_a_lossless_point_with_acceptance_columns(tiny_dirs, tmp_path):
    out = tmp_path / "ev.parquet"
    args = ("evaluate", "--model", tiny_dirs["llama"], "--dataset", "arith", "--limit", 4, "--max-new-tokens", 12,
            "--policy", "uniform:3", "--draft", "uniform:4", "--speculate", 3, "--out", out)
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    spec = df[df["policy"] == "speculative"]
    assert len(spec) == 4 and set(spec["policy_spec"]) == {"speculative:uniform:4@3"} and (spec["cost"] == 6).all()
    full = df[df["policy"] == "full"].set_index("item_id")["output"]
    assert spec["matches_full"].all() and list(spec["output"]) == list(full[spec["item_id"]])
    assert (spec["drafted"] >= spec["accepted"]).all() and spec["acceptance_rate"].between(0, 1).all()
    # its layers: every draft and verify pass per token fed back, more than full depth's 6
    assert np.allclose(spec["layers_mean"], spec["layer_passes"] / (spec["new_tokens"] - 1))
    assert (spec["layers_mean"] > 6).all()
    assert df.loc[df["policy"] != "speculative", "draft_spec"].isna().all()
    again = _cli(*args)
    assert again.exit_code == 0 and "3 finished part(s) reused" in again.output


@pytest.mark.parametrize("args,message", [
    (("--speculate", "0"), "between 1 and 16"),
    (("--speculate", "lots"), "'auto'"),
    (("--draft-threshold", "1.5"), "draft-threshold"),
])
def test_bad_speculation_options_exit_1_with_one_line(tiny_dirs, args, message):
    res = _cli("generate", "--model", tiny_dirs["llama"], "--prompt", "x", "--draft", "uniform:3", *args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("n", [8, 64])
def test_a_draft_vocabulary_keeps_the_output_and_its_head_scores_only_its_tokens(lm, tokenizer, n, tmp_path, monkeypatch):
    """FR-Spec (--draft-vocab N): the draft's head scores N tokens; the verifier's full head keeps greedy output
    equal to full depth's. The draft head's logits are the full head's on its N tokens and -inf on the others."""
    from skipbench.engine.forward import DraftHead
    from skipbench.policies.calibration import frequent_tokens

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    ps = prompts(tokenizer, 4)
    vocab = frequent_tokens(lm, n)
    out = speculate(lm, ps, make_policy("uniform:4", lm.num_layers), Speculation(k=3, draft_vocab=n), NEW, vocab=vocab)
    assert out.tokens == generate(lm, ps, None, NEW).tokens and sum(out.speculation.drafted) > 0
    h = torch.randn(2, 1, lm.model.config.hidden_size)
    full, part = lm.adapter.head(h), DraftHead(lm.adapter, vocab)(h)
    assert torch.allclose(part[..., vocab], full[..., vocab], atol=1e-5)
    outside = torch.ones(full.shape[-1], dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(part[..., outside]).all()
    with pytest.raises(SkipbenchError, match="needs its"):
        speculate(lm, ps, make_policy("uniform:4", lm.num_layers), Speculation(k=3, draft_vocab=n), NEW)


def test_the_draft_vocabulary_is_the_most_frequent_tokens_and_eos_counted_once(lm, tmp_path, monkeypatch):
    from collections import Counter

    from skipbench.data import DataSpec
    from skipbench.engine.decode import eos_ids
    from skipbench.policies import calibration

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    n, vocab = 16, lm.model.get_output_embeddings().weight.shape[0]
    ids = calibration.frequent_tokens(lm, n).tolist()
    counts = Counter(t for s in calibration.sequences(lm, DataSpec(name="text", split="train"), 10**9) for t in s)
    eos = sorted(t for t in eos_ids(lm) if t < vocab)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in eos]
    assert ids == sorted(eos + ranked[: n - len(eos)]) and len(set(ids)) == n
    monkeypatch.setattr(calibration, "sequences", lambda *a: pytest.fail("counted again"))
    assert calibration.frequent_tokens(lm, n).tolist() == ids  # from the cache
    assert len(calibration.frequent_tokens(lm, vocab)) == vocab  # more than the text holds: the lowest other ids
    for bad in (0, vocab + 1):
        with pytest.raises(SkipbenchError, match="--draft-vocab"):
            calibration.frequent_tokens(lm, bad)

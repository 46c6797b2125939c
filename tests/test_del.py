"""DEL (policies/dynamic_exit.py): the dynamic exit layer and draft length of early-exit self-speculation.

Its estimator by hand (TPL, the shadow-token counts), the exit it finds on a model whose top layers are the identity,
greedy output equal to full depth for both families and KV modes at batch 1 and 4, the states an adapting early
exit hands over (below E from its draft passes) against a verify pass over every layer, a round that drafts
nothing, and its options.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.engine import speculative
from skipbench.engine.speculative import Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.policies import parse_policies
from skipbench.policies.dynamic_exit import tokens_per_layer
from skipbench.policies.static import PlanPolicy

NEW = 24


def scaled_top(model, first: int, scale: float):
    """Layers `first`.. with their attention and MLP output projections scaled by `scale` (0: the identity)."""
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    with torch.no_grad():
        for layer in layers[first:]:
            attn = layer.self_attn
            (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj).weight.mul_(scale)
            (layer.mlp.down_proj if hasattr(layer, "mlp") else layer.fc2).weight.mul_(scale)
    return model


def model(tokenizer, family="llama", first=3, scale=0.3):
    return wrap_model(scaled_top(tiny_model(family, len(tokenizer)), first, scale), tokenizer, f"tiny-{family}")


def dynamic_exit(lm, **options):
    (spec,) = parse_policies("del", {k.replace("_", "-"): str(v) for k, v in options.items()})
    return spec.build(lm.num_layers, lm, draft=True)


def test_tokens_per_layer_by_hand():
    got = tokens_per_layer(torch.tensor([0.5, 1.0]), torch.tensor([2, 3]), torch.tensor([1, 2]), 6)
    want = [[(1 - 0.5**2) / 0.5 / (2 + 6), (1 - 0.5**3) / 0.5 / (4 + 6)], [2 / (3 + 6), 3 / (6 + 6)]]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64))


def test_it_exits_where_the_identity_layers_begin(tokenizer):
    """Layers 3-5 of 6 are the identity: an exit at 3 proposes the full model's token every time (alpha 1) at the
    least cost, so DEL exits there with the longest draft, and every draft is accepted."""
    lm = model(tokenizer, scale=0.0)
    draft = dynamic_exit(lm, max_length=5)
    ps = prompts(tokenizer, 2)
    out = speculate(lm, ps, draft, Speculation(k=3), NEW)
    assert out.tokens == generate(lm, ps, None, NEW).tokens
    assert set(draft.choices) == {(3, 5)} and draft.stop_below is None  # no mismatch at 3: no confidence stop
    assert out.speculation.acceptance_rate() == 1.0 and max(out.speculation.round_k) == 5
    a = draft.alpha()
    assert (a[draft.candidates >= 3] == 1).all() and (a[draft.candidates < 3] < 1).all()


def test_shadow_counts_by_hand(tokenizer):
    """After the prompt alone, each candidate's matches are the prompt window's tokens whose exit at that layer
    proposes the final layer's token (computed here from a full forward), with no decay yet."""
    lm = model(tokenizer)
    ps = prompts(tokenizer, 1)
    draft = dynamic_exit(lm)
    speculate(lm, ps, draft, Speculation(k=3), 1)  # one new token: the prompt's round only
    ids = torch.tensor(ps)
    hs = lm.model(ids, output_hidden_states=True).hidden_states  # [embedding, after layer 0, ..., final-normed]
    w = min(speculative.PROMPT_WINDOW, len(ps[0]))
    final = lm.adapter.head(hs[-1][:, -w:]).argmax(-1)  # transformers' last state has had the final norm
    for c, layer in enumerate(draft.candidates.tolist()):
        shadow = lm.adapter.head(lm.adapter.final_norm(hs[layer][:, -w:])).argmax(-1)
        assert draft.matched[c] == (shadow == final).sum() and draft.matched[c] + draft.missed[c] == w


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_greedy_output_is_full_depths(tokenizer, family, kv_mode):
    lm = model(tokenizer, family)
    ps = prompts(tokenizer, 4)
    ref = generate(lm, ps, None, NEW)
    for batch in (1, 4):
        draft = dynamic_exit(lm)
        out = speculate(lm, ps[:batch], draft, Speculation(k=3), NEW, kv_mode)
        assert out.tokens == ref.tokens[:batch], (family, kv_mode, batch)
        s = out.speculation
        assert sum(s.drafted) > 0 and sum(s.rejections) > 0  # it drafted, and was wrong at times
        assert {e for e, d in draft.choices if d} <= set(draft.candidates.tolist())


def test_its_exit_and_length_move_between_rounds(tokenizer):
    """On an OPT whose top three layers are scaled down, the estimates move with what the rounds verify: DEL
    drafts from more than one exit and with more than one length, and the output stays full depth's."""
    lm = model(tokenizer, "opt", first=3, scale=0.2)
    ps = prompts(tokenizer, 1)
    draft = dynamic_exit(lm)
    out = speculate(lm, ps, draft, Speculation(k=3), 40)
    assert out.tokens == generate(lm, ps, None, 40).tokens
    drafting = [c for c in draft.choices if c[1]]
    assert len({e for e, _ in drafting}) > 1 and len({d for _, d in drafting}) > 1, draft.choices
    # each round drafts at most the length chosen before it (fewer when the confidence stop or the end cuts it)
    assert all(m <= d for m, (_, d) in zip(out.speculation.round_k, draft.choices))
    assert any(m < d for m, (_, d) in zip(out.speculation.round_k, draft.choices))


class EarlyExit(PlanPolicy):
    """An early exit at 3 that adapts: records the rounds' states."""

    adapts = True

    def __init__(self, num_layers, ks=()):
        super().__init__(num_layers, [0, 1, 2], "recorder")
        self.rounds, self.ks = [], list(ks)

    def after_round(self, done):
        self.rounds.append([h.clone() for h in done.hidden])
        return self.ks.pop(0) if self.ks else None


def test_an_adapting_early_exit_hands_over_the_full_models_states(tokenizer, monkeypatch):
    """The verify pass resumes an early exit at E; the states below E handed over are the draft passes'. They equal
    those of a verify pass over every layer (the same run with the resumption turned off)."""
    lm = model(tokenizer)
    ps = prompts(tokenizer, 3)
    resumed = EarlyExit(lm.num_layers)
    out = speculate(lm, ps, resumed, Speculation(k=3), NEW)
    passes = out.speculation.layer_passes
    monkeypatch.setattr(speculative, "exit_layer", lambda draft, n: None)
    full = EarlyExit(lm.num_layers)
    ref = speculate(lm, ps, full, Speculation(k=3), NEW)
    assert out.tokens == ref.tokens and len(resumed.rounds) == len(full.rounds) > 2
    for a, b in zip(resumed.rounds, full.rounds):
        assert len(a) == len(b) == lm.num_layers + 1
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    assert sum(passes) < sum(ref.speculation.layer_passes)  # the resumed tokens ran no layer below E twice


def test_a_round_may_draft_nothing(tokenizer):
    """K = 0 from `after_round`: a plain decoding step (the full model's token, every layer once)."""
    lm = model(tokenizer)
    ps = prompts(tokenizer, 2)
    out = speculate(lm, ps, EarlyExit(lm.num_layers, ks=[0] * 100), Speculation(k=3), NEW)
    assert out.tokens == generate(lm, ps, None, NEW).tokens
    s = out.speculation
    assert set(s.round_k) == {0} and sum(s.drafted) == 0
    assert s.layer_passes == [lm.num_layers * (len(t) - 1) for t in out.tokens]


def test_sampled_tokens_follow_the_full_models_distribution():
    """Sampling with DEL (its exit, length and stop moving between rounds, the verify pass resumed at E): the
    first two tokens after the first follow the full model's joint distribution (chi-square, as for every draft)."""
    from types import SimpleNamespace

    from skipbench.engine.decode import Sampling
    from test_speculative import chi2

    small = tiny_model("llama", 6, layers=6, seed=3)
    with torch.no_grad():  # a flatter distribution (test_speculative's `small`), top layers scaled down
        for p in small.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    lm = wrap_model(scaled_top(small, 3, 0.3), SimpleNamespace(pad_token_id=0, eos_token_id=None), "tiny-vocab-6")
    sampling, n, prompt = Sampling(temperature=1.0, seed=5), 3000, [2, 3, 4, 5, 2]
    draft = dynamic_exit(lm, max_length=3)
    out = speculate(lm, [prompt] * n, draft, Speculation(k=2), 4, "fill", sampling, stop_at_eos=False)
    s = out.speculation
    assert sum(s.accepted) > n // 10 and sum(s.rejections) > n // 20  # both paths taken
    assert chi2(lm, prompt, out, sampling) > 0.01


@pytest.mark.parametrize("option, value, said", [
    ("max-length", "17", "max-length must be between 1 and 16"),
    ("max-length", "2000000000", "max-length must be between 1 and 16"),
    ("min-exit", "6", "min-exit must be between 1 and 5"),
    ("min-exit", "-1", "min-exit must be between 1 and 5"),
    ("max-length", "0", "max-length must be between 1 and 16"),
    ("decay", "0", "decay must be in (0, 1]"),
    ("decay", "nan", "decay must be in (0, 1]"),
    ("decay", "1.5", "decay must be in (0, 1]"),
])
def test_bad_options_are_one_line(tokenizer, option, value, said):
    lm = model(tokenizer)
    with pytest.raises(SkipbenchError, match=said.replace("(", r"\(").replace(")", r"\)")):
        dynamic_exit(lm, **{option.replace("-", "_"): value})


def test_an_adapting_draft_is_refused_under_compile(tokenizer):
    """Each new layer set would compile inside the timed rounds: refused before any generation."""
    lm = model(tokenizer)
    lm.adapter.compiled = True
    with pytest.raises(SkipbenchError, match="without --compile"):
        speculate(lm, prompts(tokenizer, 1), dynamic_exit(lm), Speculation(k=3), NEW)


def test_the_commands_take_it_as_a_draft_only(tiny_dirs, tmp_path):
    runner = CliRunner()
    common = ["--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "2", "--max-new-tokens", "6"]
    res = runner.invoke(app, ["evaluate", *common, "--policy", "del", "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1 and "give it as a draft" in res.stderr and not (tmp_path / "p.parquet").exists()
    res = runner.invoke(app, ["evaluate", *common, "--policy", "full", "--draft", "del", "-o", "decay=inf",
                              "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 1 and "decay must be in (0, 1]" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["evaluate", *common, "--policy", "full", "--draft", "del", "--out", str(tmp_path / "d.parquet")])
    assert res.exit_code == 0, res.output

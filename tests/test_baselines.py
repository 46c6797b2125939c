"""The classic baselines on tiny models: CALM confidence exit, ShortGPT block influence, angular-distance removal.

Each is checked against a direct computation (transformers' own hidden states, confidences recomputed from a
full-depth pass) and against the invariants the other strategies meet (static == smaller model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import prompts, tiny_model
from skipbench.data import DataSpec, load_items
from skipbench.data.prompts import encode_prompt
from skipbench.engine import Engine, generate
from skipbench.engine.decode import left_pad
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.models.loading import remove_layers
from skipbench.policies import parse_policies

CALIBRATION = {"calibration": "4", "calibration-tokens": "40"}


@pytest.fixture
def lm(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))  # calibration summaries are cached here
    return wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")


def spec(text: str, **options):
    (s,) = parse_policies(text, {k.replace("_", "-"): str(v) for k, v in options.items()})
    return s


def build(text: str, lm, **options):
    return spec(text, **options).build(lm.num_layers, lm, DataSpec(name="text"))


# ---- confidence (CALM) ------------------------------------------------------------------------------------------

def test_confidence_threshold_zero_exits_at_min_layers_and_equals_early_exit(lm, tokenizer):
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, build("confidence:0", lm, min_layers=2), 12)
    ee = generate(lm, ps, build("early-exit:2", lm), 12)
    assert ours.tokens == ee.tokens
    assert all(rec == [0, 1] for row in ours.layers for rec in row)


def test_confidence_threshold_above_one_is_full_depth(lm, tokenizer):
    ps = prompts(tokenizer, 3)
    for measure in ("softmax", "state"):
        ours = generate(lm, ps, build("confidence:1.5", lm, measure=measure), 12)
        full = generate(lm, ps, None, 12)
        assert ours.tokens == full.tokens
        assert all(len(rec) == lm.num_layers for row in ours.layers for rec in row)


@pytest.mark.parametrize("measure", ["softmax", "state"])
def test_confidence_exits_where_recomputed_confidences_say(lm, tokenizer, measure):
    """One decode step after a full-depth prompt: a token runs every layer up to its exit, so its states there are
    the full pass's; its exit is the first layer l >= min-layers whose confidence of h_l reaches the threshold."""
    min_layers = 2
    ids, present = left_pad(prompts(tokenizer, 5), 0, "cpu")
    engine = Engine(lm.adapter, "fill")
    cache, out = engine.prefill(ids, present, ids.shape[1] + 1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    full = engine.forward(nxt, cache.clone(), None, keep_hidden=True)

    ad, conf = lm.adapter, np.zeros((ids.shape[0], lm.num_layers))
    for r in range(ids.shape[0]):
        for l in range(min_layers, lm.num_layers):
            h = full.hidden[l][r, 0]
            if measure == "softmax":
                p = torch.softmax(ad.head(ad.final_norm(h[None]))[0].float(), -1).topk(2).values
                conf[r, l] = float(p[0] - p[1])
            else:
                conf[r, l] = float(torch.nn.functional.cosine_similarity(h, full.hidden[l - 1][r, 0], dim=0))
    def exits(threshold):
        return [next((l for l in range(min_layers, lm.num_layers) if conf[r, l] >= threshold), lm.num_layers)
                for r in range(ids.shape[0])]

    values = np.sort(conf[:, min_layers:].ravel())
    candidates = [round(float(a + b) / 2, 4) for a, b in zip(values, values[1:]) if b - a > 2e-4]
    # the threshold that spreads the exits most: some tokens leave early, some late
    threshold = max(candidates, key=lambda t: len(set(exits(t))))
    expected = exits(threshold)
    assert len(set(expected)) > 1

    policy = build(f"confidence:{threshold}", lm, measure=measure, min_layers=min_layers)
    policy.begin(ids.shape[0])
    ran = engine.forward(nxt, cache.clone(), policy, record=True).executed[:, 0].sum(-1).tolist()
    assert ran == expected


def test_confidence_options_are_checked(lm):
    with pytest.raises(SkipbenchError, match="measure must be one of"):
        build("confidence:0.5", lm, measure="entropy")
    with pytest.raises(SkipbenchError, match="no policy given takes it"):
        parse_policies("uniform:3", {"measure": "state"})
    with pytest.raises(SkipbenchError, match="computed from a model"):
        spec("block-influence:3").plan(6)
    with pytest.raises(SkipbenchError, match="finite"):
        spec("confidence:nan").build(6, lm)
    assert spec("confidence:0.9999999").label == "confidence:0.9999999"  # a threshold is never rounded


# ---- block influence (ShortGPT) and angular distance (Gromov et al.) ----------------------------------------------

def reference_states(lm, tokenizer, items: int = 4, max_tokens: int = 40) -> list[list[torch.Tensor]]:
    """Per calibration sequence, the residual stream entering each layer and after the last (no final norm), from
    transformers' own forward: `output_hidden_states`, whose last entry is normed, so that one is hooked."""
    seqs = []
    for it in load_items(DataSpec(name="text", split="train", limit=items)):
        ids = encode_prompt(tokenizer, it.prompt) + tokenizer(it.reference, add_special_tokens=False)["input_ids"]
        captured = []
        hook = lm.model.model.norm.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        with torch.no_grad():
            hs = lm.model(torch.tensor([ids[:max_tokens]]), output_hidden_states=True).hidden_states
        hook.remove()
        seqs.append([h[0].double() for h in hs[:-1]] + [captured[0][0].double()])
    return seqs


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_block_influence_matches_transformers_states_and_keeps_the_argmax_set(lm, tokenizer):
    from skipbench.policies.block_influence import influence

    seqs = reference_states(lm, tokenizer)
    L = lm.num_layers
    expected = np.array([1 - float(torch.cat([_cos(s[l], s[l + 1]) for s in seqs]).mean()) for l in range(L)])
    s = spec("block-influence:3", **CALIBRATION)
    got = influence(s, s.context(L, lm, DataSpec(name="text")))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    plan = s.plan(L, lm, DataSpec(name="text"))
    assert plan == sorted(np.argsort(-expected, kind="stable")[:3].tolist())
    assert [r["layer"] for r in s.explain(L, lm, DataSpec(name="text")) if r["kept"]] == plan


def test_angular_matches_transformers_states_and_removes_the_closest_block(lm, tokenizer):
    from skipbench.policies.angular import distances

    seqs = reference_states(lm, tokenizer)
    L, C = lm.num_layers, 3
    n = L - C
    expected = np.array([np.mean([float(torch.arccos(_cos(s[l][-1], s[l + n][-1]).clamp(-1, 1))) / np.pi for s in seqs])
                         for l in range(L - n)])
    s = spec(f"angular:{C}", **CALIBRATION)
    got_n, got = distances(s, s.context(L, lm, DataSpec(name="text")))
    assert got_n == n
    np.testing.assert_allclose(got, expected, atol=1e-5)
    start = int(np.argmin(expected))
    plan = s.plan(L, lm, DataSpec(name="text"))
    assert plan == [i for i in range(L) if not start <= i < start + n]
    assert L - 1 in plan  # the last layer is never removed


def test_calibration_is_cached_and_a_corrupt_cache_is_recomputed(lm, tmp_path, monkeypatch):
    from skipbench.policies import calibration
    from skipbench.policies.block_influence import influence

    s = spec("block-influence:3", **CALIBRATION)
    ctx = s.context(lm.num_layers, lm, DataSpec(name="text"))
    first = influence(s, ctx)
    compute = calibration._compute
    monkeypatch.setattr(calibration, "_compute", lambda *a: pytest.fail("recomputed although cached"))
    np.testing.assert_array_equal(influence(s, ctx), first)  # read back from the cache
    (cached,) = (tmp_path / "cache" / "calibration").glob("*.json")
    cached.write_text("{not json")
    calls = []
    monkeypatch.setattr(calibration, "_compute", lambda *a: calls.append(1) or compute(*a))
    np.testing.assert_allclose(influence(s, ctx), first)
    assert calls == [1] and cached.read_text().startswith("{\"cos\"")


@pytest.mark.parametrize("text", ["block-influence:3", "angular:3"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_calibrated_plans_equal_the_smaller_model(lm, tokenizer, text, kv_mode):
    """Invariant 2 holds for calibrated plans as for any static plan."""
    from test_engine import hf_generate

    policy = build(text, lm, **CALIBRATION)
    keep = policy.executed_layers()
    assert len(keep) == 3
    ps = prompts(tokenizer, 1)
    ours = generate(lm, ps, policy, max_new_tokens=12, kv_mode=kv_mode, prompt_depth="policy")
    assert ours.tokens == hf_generate(remove_layers(lm.model, keep, share_weights=False), ps, 12, pad_id=0, eos_id=1)


def test_the_baselines_work_in_every_command(tiny_dirs, tmp_path, monkeypatch):
    """plan, generate, evaluate, cosine, bench and the oracle accept them as they accept any strategy."""
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from skipbench.cli import app

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    model, cal = tiny_dirs["llama"], ["-o", "calibration=3", "-o", "calibration-tokens=32"]
    res = run("plan", "--model", model, "--policy", "block-influence:3", *cal)
    assert res.exit_code == 0, res.output
    assert "block_influence" in res.stdout and len(res.stdout.strip().splitlines()[-1].split()) == 3
    res = run("generate", "--model", model, "--policy", "confidence:0", "-o", "min-layers=2", "--prompt", "hi",
              "--max-new-tokens", 4, "--json")
    assert res.exit_code == 0, res.output
    assert {tuple(r) for r in json.loads(res.stdout)["layers_per_token"]} == {(0, 1)}
    ev = tmp_path / "ev.parquet"
    args = ("--model", model, "--dataset", "text", "--limit", 3, "--max-new-tokens", 4)
    res = run("evaluate", *args, "--policy", "block-influence:3", *cal, "--out", ev)  # --split all: calibration items
    assert res.exit_code == 1 and "--split test" in res.output and not ev.exists()
    res = run("evaluate", *args, "--split", "test", "--out", ev, "--policy",
              "confidence:0,1.5,block-influence:3,angular:4", "-o", "min-layers=2", *cal)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(ev)
    # options away from their defaults are part of the label; the others are not
    assert set(df["policy_spec"]) == {"full", "confidence:0[min-layers=2]", "confidence:1.5[min-layers=2]",
                                      "block-influence:3[calibration=3;calibration-tokens=32]",
                                      "angular:4[calibration=3;calibration-tokens=32]"}
    conf0 = df[df["policy_spec"] == "confidence:0[min-layers=2]"]
    assert set(conf0["cost"]) == {2} and all(set(t) <= {2} for t in conf0["layers_per_token"])
    res = run("oracle", "--runs", ev, "--budget", 4, "--out", tmp_path / "o.parquet")
    assert res.exit_code == 0, res.output
    res = run("cosine", "--model", model, "--dataset", "text", "--limit", 2, "--policy", "angular", "--costs", 3,
              "--out", tmp_path / "cos.parquet", *cal)
    assert res.exit_code == 1 and "--split test" in res.output
    res = run("cosine", "--model", model, "--dataset", "text", "--split", "test", "--limit", 2,
              "--policy", "block-influence,angular",
              "--costs", 3, "--max-new-tokens", 3, "--out", tmp_path / "cos.parquet", *cal)
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(tmp_path / "cos.parquet")["strategy"]) == {"block-influence", "angular"}
    (tmp_path / "rep").mkdir()  # a cosine result without the paper's three strategies: reported, no verdicts
    for name in ("cos.parquet", "cos.json", "cos-agg.parquet", "cos.png"):
        (tmp_path / "rep" / name.replace("cos", "cosine-baselines")).write_bytes((tmp_path / name).read_bytes())
    res = run("report", "--results", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    assert "| block-influence |" in (tmp_path / "rep" / "REPORT.md").read_text()
    # a threshold strategy at its points: confidence 0 exits every token at --min-layers (= early exit there),
    # above 1 none exits (= full depth); each pass is costed by the layers its tokens ran
    res = run("cosine", "--model", model, "--dataset", "text", "--split", "test", "--limit", 2, "--max-new-tokens", 4,
              "--policy", "confidence:0,1.5,early-exit:2", "-o", "min-layers=2", "--out", tmp_path / "conf.parquet")
    assert res.exit_code == 0, res.output
    cos = pd.read_parquet(tmp_path / "conf.parquet").set_index(["strategy", "point", "item_id", "token"]).sort_index()
    exit0, early, never = cos.loc[("confidence", "0")], cos.loc[("early-exit", "2")], cos.loc[("confidence", "1.5")]
    assert (exit0["layers"] == 2).all() and (exit0["cost"] == 2).all() and (never["layers"] == 6).all()
    for m in ("cos_final", "cos_layerwise", "kl_next", "top1_agree"):
        assert exit0[m].to_numpy() == pytest.approx(early[m].to_numpy(), abs=1e-5), m
    assert never["cos_final"].to_numpy() == pytest.approx(1, abs=1e-5) and (never["cost"] == 6).all()
    agg = pd.read_parquet(tmp_path / "conf-agg.parquet").set_index(["strategy", "point"])
    assert agg.loc[("confidence", "0"), "layers"] == 2 and agg.loc[("confidence", "1.5"), "layers"] == 6
    res = run("cosine", "--model", model, "--dataset", "text", "--policy", "confidence", "--out", tmp_path / "c.parquet")
    assert res.exit_code == 1 and "a threshold given as NAME:T" in res.output
    res = run("cosine", "--model", model, "--dataset", "text", "--split", "test", "--limit", 2, "--max-new-tokens", 4,
              "--policy", "confidence:0.5", "-o", "decay=2", "--out", tmp_path / "c.parquet")
    assert res.exit_code == 0, res.output
    res = run("bench", "--model", model, "--policy", "full,confidence:0.5,angular:3", "--batch-sizes", 1,
              "--max-new-tokens", 3, "--repeats", 1, "--warmup", 0, "--out", tmp_path / "b.parquet", *cal)
    assert res.exit_code == 0, res.output
    assert {"confidence:0.5", "angular:3", "removed:angular:3"} <= set(pd.read_parquet(tmp_path / "b.parquet")["variant"])
    res = run("evaluate", "--model", model, "--dataset", "text", "--limit", 2, "--policy", "uniform:3",
              "-o", "measure=state", "--out", tmp_path / "x.parquet")
    assert res.exit_code == 1 and "no policy given takes it" in res.output


def test_atomic_dir_replaces_restores_and_leaves_live_temporaries(tmp_path):
    import os
    import subprocess

    from skipbench.store.results import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    dead = subprocess.Popen(["true"])
    dead.wait()  # a finished process: its pid names temporaries nobody writes any more
    target.replace(tmp_path / f".model.old-{dead.pid}")  # a run killed between its two renames
    (tmp_path / f".model.tmp-{dead.pid}").mkdir()
    live = tmp_path / f".model.tmp-{os.getppid()}"  # a process that is alive: its temporary stays
    live.mkdir()
    with atomic_dir(target) as tmp:
        assert (target / "a").read_text() == "1"  # the folder moved aside was put back before anything else
        (tmp / "a").write_text("3")
    assert (target / "a").read_text() == "3" and live.exists()
    assert not (tmp_path / f".model.tmp-{dead.pid}").exists()


def test_a_decaying_threshold_follows_each_tokens_position_not_the_calls():
    """CALM Eq. 5 by generated position t: one pass over three tokens (cosine) and three one-token steps (decoding)
    give each token the same threshold; rows with different left padding count from their own first token."""
    from types import SimpleNamespace

    from skipbench.policies.confidence import ConfidencePolicy

    def policy():
        p = ConfidencePolicy(SimpleNamespace(num_layers=4), 0.5, "state", 1, 2.0, 4, "c")
        p.begin(2)
        return p

    def expected(t):
        return min(1.0, 0.9 * 0.5 + 0.1 * math.exp(-2.0 * t / 4))

    one_pass = policy()
    one_pass.new_step(torch.tensor([[5, 6, 7], [3, 4, 5]]))
    lam = one_pass._lambda
    steps = policy()
    for k in range(3):
        steps.new_step(torch.tensor([[5 + k], [3 + k]]))
        assert steps._lambda[:, 0].tolist() == pytest.approx(lam[:, k].tolist())
    assert lam[0].tolist() == pytest.approx([expected(t) for t in range(3)]) and lam[1].tolist() == lam[0].tolist()
    one_pass.new_step(torch.tensor([[8], [6]]))  # the next step of the same sequences: t = 3
    assert one_pass._lambda[:, 0].tolist() == pytest.approx([expected(3)] * 2)

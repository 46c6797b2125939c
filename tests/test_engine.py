"""Invariants 1-3 of DESIGN.md on tiny random models: full == HF, static == smaller model, cached == uncached."""

from __future__ import annotations

import pytest
import torch

from conftest import prompts, tiny_model
from skipbench.engine import Engine, generate
from skipbench.engine.decode import left_pad
from skipbench.models import wrap_model
from skipbench.models.loading import remove_layers
from skipbench.engine.protocol import Policy
from skipbench.policies import make_policy

FAMILIES = ["llama", "qwen3", "opt", "mistral", "qwen2"]


def lm_for(family, tokenizer, layers=6, device="cpu"):
    return wrap_model(tiny_model(family, len(tokenizer), layers), tokenizer, f"tiny-{family}", device)


def hf_generate(model, prompt_ids, new_tokens, pad_id, eos_id):
    ids, present = left_pad(prompt_ids, pad_id, model.device)
    out = model.generate(
        input_ids=ids, attention_mask=present.long(), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=pad_id, eos_token_id=eos_id,
    )
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


@pytest.mark.lane
@pytest.mark.parametrize("family", FAMILIES)
def test_full_logits_equal_hf_forward(family, tokenizer, device):
    lm = lm_for(family, tokenizer, device=device)
    ids, present = left_pad(prompts(tokenizer, 3), 0, device)
    engine = Engine(lm.adapter)
    cache = engine.new_cache(ids.shape[0], ids.shape[1], device, torch.float32)
    cache.pad = (~present).sum(1)
    ours = engine.forward(ids, cache, None, present=present).logits
    position_ids = (present.long().cumsum(1) - 1).clamp_min(0)
    kwargs = {} if family == "opt" else {"position_ids": position_ids}
    ref = lm.model(input_ids=ids, attention_mask=present.long(), **kwargs).logits
    assert (ours - ref)[present].abs().max().item() <= 1e-4


@pytest.mark.lane
@pytest.mark.parametrize("family", FAMILIES)
def test_full_greedy_equals_hf_generate(family, tokenizer, device):
    lm = lm_for(family, tokenizer, device=device)
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, make_policy("full", lm.num_layers), max_new_tokens=20)
    ref = hf_generate(lm.model, ps, 20, pad_id=0, eos_id=1)
    assert ours.tokens == ref
    assert all(len(rec) == lm.num_layers for row in ours.layers for rec in row)


@pytest.mark.lane
@pytest.mark.parametrize("family", FAMILIES)
def test_full_greedy_equals_hf_generate_in_bfloat16(family, tokenizer, device):
    """bf16 on the CPU (AVX512-BF16/AMX where the CPU has them; elsewhere torch emulates it, slower, same numbers):
    full depth gives model.generate's tokens, as in fp32; on the lane's device too."""
    lm = wrap_model(tiny_model(family, len(tokenizer), 6).to(torch.bfloat16), tokenizer, f"tiny-{family}", device)
    assert lm.dtype == torch.bfloat16
    ps = prompts(tokenizer, 3)
    ours = generate(lm, ps, make_policy("full", lm.num_layers), max_new_tokens=20)
    assert ours.tokens == hf_generate(lm.model, ps, 20, pad_id=0, eos_id=1)


STATIC_SPECS = [("uniform", 3), ("early-exit", 4), ("layers", (0, 2, 5)), ("random", 4)]


def static_policy(name, arg, num_layers):
    text = f"{name}:{','.join(map(str, arg))}" if name == "layers" else f"{name}:{arg}"
    policy = make_policy(text, num_layers, seed=3)
    policy.begin(1)
    return policy


@pytest.mark.lane
@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
@pytest.mark.parametrize("spec", STATIC_SPECS)
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_static_plan_equals_smaller_model(family, spec, kv_mode, tokenizer, device):
    """Invariant 2: with the prompt under the plan too, a plan running layers S == the model with only S."""
    lm = lm_for(family, tokenizer, device=device)
    policy = static_policy(*spec, lm.num_layers)
    keep = policy.executed_layers()
    assert len(keep) < lm.num_layers
    ps = prompts(tokenizer, 1)  # batch 1: one random draw, so one smaller model
    ours = generate(lm, ps, policy, max_new_tokens=16, kv_mode=kv_mode, prompt_depth="policy")
    ref = hf_generate(remove_layers(lm.model, keep, share_weights=False), ps, 16, pad_id=0, eos_id=1)
    assert ours.tokens == ref
    assert all(rec == keep for row in ours.layers for rec in row)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("spec", STATIC_SPECS)
def test_static_plan_kv_modes_agree_with_full_prompt(family, spec, tokenizer):
    """With a full-depth prompt a static plan never reads a skipped layer's cache: fill == none == auto, and auto
    runs `none` for a plan every token follows (per-sequence random draws are not one: `fill`)."""
    lm = lm_for(family, tokenizer)
    ps = prompts(tokenizer, 3)
    runs = [generate(lm, ps, static_policy(*spec, lm.num_layers), 16, kv_mode=m) for m in ("fill", "none", "auto")]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert runs[0].layers == runs[1].layers == runs[2].layers
    assert [r.kv_mode for r in runs] == ["fill", "none", "fill" if spec[0] == "random" else "none"]
    assert generate(lm, ps, None, 2).kv_mode == "fill"  # full depth skips nothing: auto keeps `fill`


class SignGate(Policy):
    """A hidden-state-dependent per-token policy: run layer i when the state's coordinate i is > 0."""

    static = False

    def gate(self, layer, hidden):
        return True if layer == 0 else hidden[..., layer] > 0


def per_token_policies(num_layers):
    return {
        "uniform": make_policy("uniform:3", num_layers),
        "random-token": make_policy("random-token:3", num_layers, seed=5),
        "sign": SignGate(num_layers),
    }


@pytest.mark.lane
@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("policy_name", ["uniform", "random-token", "sign"])
def test_cached_equals_uncached(family, kv_mode, policy_name, tokenizer, device):
    """Invariant 3: token-by-token decoding with a cache == one pass over the whole sequence."""
    lm = lm_for(family, tokenizer, device=device)
    ps = prompts(tokenizer, 3)
    ids, present = left_pad(ps, 0, device)
    batch, width = ids.shape
    gen = torch.randint(3, len(tokenizer), (batch, 8), generator=torch.Generator().manual_seed(0)).to(device)
    engine = Engine(lm.adapter, kv_mode)

    policy = per_token_policies(lm.num_layers)[policy_name]
    policy.begin(batch)
    cache = engine.new_cache(batch, width + 8, device, torch.float32)
    cache.pad = (~present).sum(1)
    engine.forward(ids, cache, None, present=present)
    step_logits, step_layers = [], []
    for t in range(gen.shape[1]):
        out = engine.forward(gen[:, t : t + 1], cache, policy, record=True)
        step_logits.append(out.logits[:, 0])
        step_layers.append(out.executed[:, 0])

    policy = per_token_policies(lm.num_layers)[policy_name]
    policy.begin(batch)
    whole = torch.cat([ids, gen], 1)
    cache = engine.new_cache(batch, whole.shape[1], device, torch.float32)
    cache.pad = (~present).sum(1)
    skippable = torch.zeros_like(whole, dtype=torch.bool)
    skippable[:, width:] = True
    out = engine.forward(whole, cache, policy, present=torch.cat([present, skippable[:, width:]], 1),
                         skippable=skippable, record=True)
    assert torch.equal(out.executed[:, width:], torch.stack(step_layers, 1))
    skipped_some = not bool(out.executed[:, width:].all())
    assert skipped_some
    assert (out.logits[:, width:] - torch.stack(step_logits, 1)).abs().max().item() <= 1e-4


def test_none_mode_writes_no_kv_for_skipped_layers(tokenizer):
    lm = lm_for("llama", tokenizer)
    policy = make_policy("uniform:3", lm.num_layers)
    ids, present = left_pad(prompts(tokenizer, 2), 0, "cpu")
    for mode in ("none", "fill"):
        engine = Engine(lm.adapter, mode)
        cache = engine.new_cache(2, ids.shape[1] + 4, "cpu", torch.float32)
        cache.pad = (~present).sum(1)
        engine.forward(ids, cache, None, present=present)
        for t in range(4):
            engine.forward(torch.full((2, 1), 5), cache, policy)
        gen = slice(ids.shape[1], ids.shape[1] + 4)
        for i in range(lm.num_layers):
            written = bool(cache.k[i][:, :, gen].abs().sum() > 0)
            runs = i in policy.executed_layers()
            assert written == (runs or mode == "fill"), (mode, i)
            assert bool(cache.valid[i][:, gen].all()) == (runs or mode == "fill")


def test_sampling_is_reproducible_from_seed(tokenizer):
    from skipbench.engine import Sampling

    lm = lm_for("llama", tokenizer)
    ps = prompts(tokenizer, 2)
    full = make_policy("full", lm.num_layers)
    a = generate(lm, ps, full, 12, sampling=Sampling(temperature=1.0, top_p=0.9, seed=7))
    b = generate(lm, ps, full, 12, sampling=Sampling(temperature=1.0, top_p=0.9, seed=7))
    c = generate(lm, ps, full, 12, sampling=Sampling(temperature=1.0, top_p=0.9, seed=8))
    greedy = generate(lm, ps, full, 12)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens  # another seed, another sample
    assert a.tokens != greedy.tokens  # sampling is not greedy decoding


@pytest.mark.lane
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("policy_name", ["random-seq", "random-token", "sign"])
def test_gather_equals_mask(family, kv_mode, policy_name, tokenizer, device):
    """--impl gather and --impl mask give identical tokens and per-token layer records for the same gates."""
    lm = lm_for(family, tokenizer, device=device)
    ps = prompts(tokenizer, 4)

    def make():
        if policy_name == "sign":
            return SignGate(lm.num_layers)
        return make_policy(f"{policy_name.replace('-seq', '')}:3", lm.num_layers, seed=2)

    runs = {}
    for impl in ("gather", "mask"):
        runs[impl] = generate(lm, ps, make(), 12, kv_mode=kv_mode, impl=impl)
    assert runs["gather"].tokens == runs["mask"].tokens
    assert runs["gather"].layers == runs["mask"].layers
    assert any(len(rec) < lm.num_layers for row in runs["gather"].layers for rec in row)


@pytest.mark.lane
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_one_loop_soft_gates_of_0_and_1_equal_the_hard_plan(tokenizer, family, device):
    """Training's soft gates and generation's hard gates go through the same loop: gates of exactly 1 and 0 per
    layer give the logits of the static plan that runs those layers (fill mode, where both write every K/V)."""
    from skipbench.engine.protocol import GateFn

    lm = lm_for(family, tokenizer, device=device)
    plan = make_policy("uniform:3", lm.num_layers)
    ids, present = left_pad(prompts(tokenizer, 2), 0, device)
    resp = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
    engine = Engine(lm.adapter, "fill")
    runs = set(plan.executed_layers())
    soft = GateFn(lm.num_layers, lambda i, h: torch.full(h.shape[:2], float(i in runs), device=h.device))
    cache, _ = engine.prefill(ids, present, ids.shape[1] + 4)
    hard = engine.forward(resp, cache.clone(), plan).logits
    out = engine.run(resp, cache, soft)
    assert len(out.gates) == lm.num_layers  # every soft gate is handed back (the regulariser reads them)
    torch.testing.assert_close(out.logits, hard, rtol=1e-5, atol=1e-5)


def _plant_costs(lm, kv_mode: str, batch: int, gather_rows: set[int]):
    """A cost table in the cache that gathers at `gather_rows` running rows and runs densely otherwise (plain and
    routed layers alike), so `--impl auto` takes both paths within one run."""
    from skipbench.engine import costs

    path, key = costs.table_path(lm.adapter, kv_mode, batch)
    cheap = lambda gathered: tuple(1.0 if (r in gather_rows) == gathered else 2.0 for r in range(1, batch + 1))  # noqa: E731
    table = costs.LayerCosts(batch=batch, rows=tuple(range(1, batch + 1)), dense=cheap(False), gathered=cheap(True),
                             routed_dense=cheap(False), routed_gathered=cheap(True), attention=1.0, mlp=1.0, kv=0.1)
    costs.save(path, table, key)
    return table


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_auto_with_a_mixed_choice_equals_gather_and_mask(family, kv_mode, tokenizer, tmp_path, monkeypatch):
    """--impl auto, choosing per layer and step (here dense at some running-row counts, gathered at others), gives
    the tokens and layer records of gather and of mask."""
    from skipbench.engine.forward import Meter

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    lm = lm_for(family, tokenizer)
    ps = prompts(tokenizer, 4)
    table = _plant_costs(lm, kv_mode, 4, gather_rows={1, 3})
    assert table.gather_pays(1) and not table.gather_pays(2) and table.crossover() == "gathers at [1, 3] running rows of 4"
    runs, meters = {}, {}
    for impl in ("gather", "mask", "auto"):
        meters[impl] = Meter()
        runs[impl] = generate(lm, ps, make_policy("random-token:3", lm.num_layers, seed=2), 12, kv_mode=kv_mode,
                              impl=impl, meter=meters[impl])
    assert runs["auto"].tokens == runs["gather"].tokens == runs["mask"].tokens
    assert runs["auto"].layers == runs["gather"].layers == runs["mask"].layers
    assert meters["auto"].dense > 0 and meters["auto"].gathered > 0  # both paths were taken
    assert meters["gather"].dense == 0 and meters["mask"].gathered == 0
    assert meters["auto"].dense + meters["auto"].gathered == meters["mask"].dense


@pytest.mark.parametrize("kv", [True, False])
def test_routed_layers_dense_equal_gathered(kv, tokenizer, tmp_path, monkeypatch):
    """A routed (FlexiDepth) layer whose MLP runs for every token and is then replaced for the skipped ones gives
    what the gathered MLP gives, as does auto choosing between the two."""
    from skipbench.engine.forward import Meter
    from skipbench.policies.flexidepth import FlexiDepth, FlexiPolicy

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    lm = lm_for("llama", tokenizer)
    torch.manual_seed(0)
    flexi = FlexiDepth(64, 6, reduction=4, kv=kv)
    with torch.no_grad():
        for r in flexi.routers.values():
            r.out.bias.fill_(0.0)  # G ~ 0.5 around tau: some tokens skip
    ps = prompts(tokenizer, 4)
    _plant_costs(lm, "fill" if kv else "none", 4, gather_rows={2})
    runs, meters = {}, {}
    for impl in ("gather", "mask", "auto"):
        meters[impl] = Meter()
        runs[impl] = generate(lm, ps, FlexiPolicy(flexi), 10, impl=impl, meter=meters[impl])
    assert runs["auto"].tokens == runs["gather"].tokens == runs["mask"].tokens
    assert runs["auto"].layers == runs["gather"].layers == runs["mask"].layers
    assert meters["mask"].dense > 0 and meters["auto"].dense > 0 and meters["auto"].gathered > 0
    m = meters["mask"]
    assert m.mlp < m.steps * lm.num_layers
    # a layer where some token is routed runs attention and MLP; where none is, a KV-preserving skip computes only
    # the K/V (counted as such, not as attention), and a skip without K/V nothing
    assert m.attention == m.mlp
    assert m.kv == (m.steps * lm.num_layers - m.attention if kv else 0) and (m.kv > 0) == kv
    assert meters["mask"].skip_seconds > 0 and meters["mask"].policy_seconds > 0  # adapters and routers, apart


@pytest.mark.parametrize("kv_mode", ["fill", "none"])
def test_meter_counts_the_parts_a_batch_runs(kv_mode, tokenizer):
    """At batch 1 a per-token policy's parts are its layers: attention and MLP where the token runs, only the K/V
    where it skips (`fill`); a static plan at any batch runs its layers for every row."""
    from skipbench.engine.forward import Meter

    lm = lm_for("llama", tokenizer)
    m = Meter()
    gen = generate(lm, prompts(tokenizer, 1), make_policy("random-token:2", lm.num_layers, seed=1), 8,
                   kv_mode=kv_mode, meter=m, stop_at_eos=False)
    ran = sum(map(len, gen.layers[0]))
    assert m.steps == 7 and m.attention == m.mlp == ran == 7 * 2
    assert m.kv == (7 * (lm.num_layers - 2) if kv_mode == "fill" else 0)
    m = Meter()
    generate(lm, prompts(tokenizer, 3), make_policy("uniform:3", lm.num_layers), 6, kv_mode=kv_mode, meter=m,
             stop_at_eos=False)
    assert m.steps == 5 and m.attention == m.mlp == 5 * 3 and m.dense == m.gathered == 0


def test_meter_times_the_policy_apart(tokenizer):
    """A policy's own calls are the meter's policy time: a gate that sleeps 2 ms per layer shows at least that."""
    import time

    from skipbench.engine.forward import Meter

    class Slow(Policy):
        static = True

        def gate(self, layer, hidden):
            time.sleep(0.002)
            return True

    lm = lm_for("llama", tokenizer)
    m = Meter()
    began = time.perf_counter()
    generate(lm, prompts(tokenizer, 2), Slow(lm.num_layers), 5, meter=m, stop_at_eos=False)
    total = time.perf_counter() - began
    assert m.steps == 4 and 4 * lm.num_layers * 0.002 <= m.policy_seconds < total


def test_cost_table_is_measured_once_and_read_back(tokenizer, tmp_path, monkeypatch):
    """`auto`'s table is measured on first need (every running-row count, both ways), written to the cache and
    read back after; a damaged table is noted and measured again; another batch or KV mode is another table."""
    from skipbench import errors
    from skipbench.engine import costs

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(errors, "NOTED", [])
    monkeypatch.setattr(costs, "_READ", {})  # nothing read in this process yet
    lm = lm_for("llama", tokenizer)
    engine = Engine(lm.adapter, "fill")
    real_calibrate = costs.calibrate
    first = costs.layer_costs(engine, 3)
    assert first.rows == (1, 2, 3) and len(first.dense) == len(first.gathered) == len(first.routed_dense) == 3
    assert min(first.dense + first.gathered + (first.attention, first.mlp, first.kv)) > 0
    assert any("timing one layer at batch 3" in n for n in errors.NOTED)
    monkeypatch.setattr(costs, "calibrate", lambda *a: pytest.fail("the cached table was not read"))
    monkeypatch.setattr(costs, "_READ", {})
    assert costs.layer_costs(engine, 3) == first  # from the file
    path, _ = costs.table_path(lm.adapter, "fill", 3)
    others = {costs.table_path(lm.adapter, "fill", 4)[0], costs.table_path(lm.adapter, "none", 3)[0]}
    assert len(others) == 2 and path not in others
    good = path.read_text()
    for damage in ("{not json", good.replace('"batch": 3', '"batch": 4'), good.replace('"rows": [1, 2, 3]', '"rows": [1, 2]'),
                   good.replace('"kv_mode": "fill"', '"kv_mode": "none"')):  # not JSON; another batch; short; another key
        assert damage != good
        path.write_text(damage)
        monkeypatch.setattr(costs, "calibrate", real_calibrate)
        monkeypatch.setattr(costs, "_READ", {})
        monkeypatch.setattr(errors, "NOTED", [])
        again = costs.layer_costs(engine, 3)
        assert any("measuring it again" in n for n in errors.NOTED) and again.rows == (1, 2, 3)
        monkeypatch.setattr(costs, "calibrate", lambda *a: pytest.fail("the table was not rewritten"))
        monkeypatch.setattr(costs, "_READ", {})
        assert costs.layer_costs(engine, 3) == again  # rewritten


def test_cost_table_in_bfloat16_and_for_large_batches(tokenizer, tmp_path, monkeypatch):
    """Calibration runs in the model's dtype (bf16 here) and times a grid of running-row counts above 16 rows,
    interpolating between them; auto's choice in bf16 gives gather's tokens."""
    from skipbench.engine import costs

    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path))
    lm = lm_for("llama", tokenizer)
    lm.model.to(torch.bfloat16)
    table = costs.calibrate(Engine(lm.adapter, "fill"), 2)
    assert table.rows == (1, 2) and min(table.dense + table.routed_gathered) > 0
    assert costs.measured_rows(8) == tuple(range(1, 9))
    grid = costs.measured_rows(64)
    assert grid[:4] == (1, 2, 3, 4) and grid[-2:] == (63, 64) and len(grid) < 20
    flat = costs.LayerCosts(batch=64, rows=grid, dense=(2.0,) * len(grid), gathered=tuple(float(r) / 10 for r in grid),
                            routed_dense=(1.0,) * len(grid), routed_gathered=(1.0,) * len(grid), attention=1, mlp=1, kv=1)
    flat.check(64)
    assert flat.gather_pays(19) and not flat.gather_pays(21)  # 1.9 and 2.1 interpolated against 2.0
    ps = prompts(tokenizer, 2)
    a = generate(lm, ps, make_policy("random-token:3", lm.num_layers, seed=2), 6, impl="auto")
    b = generate(lm, ps, make_policy("random-token:3", lm.num_layers, seed=2), 6, impl="gather")
    assert a.tokens == b.tokens

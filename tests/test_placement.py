"""A model placed across devices by accelerate (issue 44): half the layers on the CPU, half offloaded to disk (read in
only while their module runs, on `meta` otherwise), gives the single-device run's tokens for every kind of policy;
adapters read no weight directly; the command line takes --device-map and refuses a bad one in one line."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.engine.speculative import Speculation, speculate
from skipbench.errors import SkipbenchError
from skipbench.models import wrap_model
from skipbench.models.loading import Placement, load_model, placing
from skipbench.policies import make_policy, parse_policies

NEW = 12


def half_on_disk(family: str, layers: int = 6) -> dict:
    """Embedding, head and the first half of the layers on the CPU; the second half and the final norm on disk."""
    stack = "model.decoder" if family == "opt" else "model"
    parts = {f"{stack}.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}
    if family == "opt":
        return {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "disk",
                "model.decoder.final_layer_norm": "disk", "lm_head": "cpu", **parts}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "cpu", **parts}


@pytest.fixture(scope="module", params=["llama", "opt"])
def pair(request, tokenizer, tmp_path_factory):
    """The same tiny model twice: on one device, and placed by a map file (CPU and disk)."""
    family = request.param
    map_file = tmp_path_factory.mktemp("map") / "map.json"
    map_file.write_text(json.dumps(half_on_disk(family)))
    single = wrap_model(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}")
    placed = wrap_model(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}",
                        placement=Placement(str(map_file)))
    assert not placed.adapter.placed  # every part runs on the CPU (the disk's layers are read in there) ...
    placed.adapter.placed = True  # ... so take the moving paths anyway: moves between equal devices, but every line run
    return single, placed


def test_the_map_offloads_half_the_layers(pair):
    _, placed = pair
    layers = placed.adapter.layers
    assert [next(l.parameters()).device.type for l in layers] == ["cpu"] * 3 + ["meta"] * 3  # on disk until they run
    assert placed.placement["modules"]["model.layers.5" if placed.adapter.family != "opt" else "model.decoder.layers.5"] == "disk"
    assert placed.record()["placement"]["layers"] == ["cpu"] * 6
    assert placed.device == torch.device("cpu")


def policy(name: str, lm, kv_mode: str):
    if name == "flexidepth":  # an untrained router with gates around its threshold: some tokens skip
        from skipbench.policies.flexidepth import FlexiDepth, FlexiPolicy

        torch.manual_seed(0)
        flexi = FlexiDepth(64, lm.num_layers, reduction=4, kv=kv_mode == "fill")
        with torch.no_grad():
            for r in flexi.routers.values():
                r.out.bias.fill_(0.0)
        return FlexiPolicy(flexi)
    if name.startswith(("angular", "block-influence")):  # calibrated on a few of the embedded suites' prompts
        (spec,) = parse_policies(name, {"calibration": "3", "calibration-tokens": "16"}, seed=1)
        return spec.build(lm.num_layers, lm)
    return make_policy(name, lm.num_layers, lm, seed=1)


@pytest.mark.parametrize("kv_mode", ["fill", "none"])
@pytest.mark.parametrize("name", ["full", "uniform:4", "random-token:3", "confidence:0.05", "flexidepth"])
def test_placed_generation_gives_the_single_device_tokens(pair, tokenizer, name, kv_mode):
    single, placed = pair
    ps = prompts(tokenizer, 3)
    ref = generate(single, ps, policy(name, single, kv_mode), NEW, kv_mode)
    out = generate(placed, ps, policy(name, placed, kv_mode), NEW, kv_mode)
    assert out.tokens == ref.tokens
    assert out.layers == ref.layers
    if name == "random-token:3":  # the per-token policy did skip
        assert any(len(rec) < placed.num_layers for row in out.layers for rec in row)


@pytest.mark.parametrize("name", ["early-exit:3", "clasp:3", "del", "knapspec"])
def test_a_placed_self_speculative_draft_keeps_the_full_models_tokens(pair, tokenizer, name, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    single, placed = pair
    ps = prompts(tokenizer, 3)
    ref = generate(single, ps, None, NEW)
    (spec,) = parse_policies(name, {"interval": "1"} if name.startswith("clasp") else None, seed=1)
    draft = spec.build(placed.num_layers, placed, draft=True)
    out = speculate(placed, ps, draft, Speculation(k=3), NEW)
    assert out.tokens == ref.tokens
    if name in ("early-exit:3", "clasp:3"):  # DEL and KnapSpec may choose, on a random model, not to draft at all
        assert sum(out.speculation.drafted) > 0


def test_no_adapter_reads_a_weight_but_through_the_guard():
    """An offloaded weight is `meta` until its module runs: reading `.weight` would compute with nothing. Adapters
    call modules, and read a weight only through `_weight`, which returns None for an offloaded one."""
    import skipbench.models.adapters as adapters

    tree = ast.parse(Path(adapters.__file__).read_text())
    reads = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name != "_weight":
            reads += [(fn.name, n.lineno) for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr == "weight"]
    assert reads == []


def test_max_memory_spills_layers_to_disk(tokenizer):
    """accelerate's own placement within --max-memory: a CPU budget smaller than the model sends layers to disk, and
    the tokens stay the single device's."""
    single = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    placed = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny",
                        placement=Placement("sequential", max_memory="cpu=600KB"))
    assert "disk" in placed.placement["modules"].values()
    ps = prompts(tokenizer, 2)
    assert generate(placed, ps, None, NEW).tokens == generate(single, ps, None, NEW).tokens


@pytest.mark.parametrize("placement, message", [
    (dict(device_map="nowhere.json"), "not one of auto, balanced"),
    (dict(device_map="auto", max_memory="cpu"), "not DEVICE=SIZE"),
    (dict(device_map="auto", max_memory="cpu=-1GB"), "not a positive size"),
    (dict(device_map="auto", max_memory="cpu=lots"), "not a positive size"),
    (dict(device_map="auto", max_memory="cpu=nan"), "not a positive size"),
    (dict(device_map="auto", max_memory="cpu=1e999GB"), "not a positive size"),
    (dict(device_map="auto", max_memory="3=1GB"), "names a GPU this process does not have"),
    (dict(device_map="auto", gpus_per_rank=-1), "--gpus-per-rank must be >= 1"),
])
def test_bad_placements_are_refused_before_any_work(placement, message):
    with pytest.raises(SkipbenchError, match=message):
        Placement(**placement)


def test_a_map_file_is_checked_up_front(tmp_path):
    bad = tmp_path / "map.json"
    for text, message in (("[1, 2]", "a JSON object"), ("{", "not valid JSON"), ('{"model": "tpu"}', "not a device"),
                          ('{"model": 7}', "names a GPU this process does not have"),
                          ('{"model": true}', "not a device")):
        bad.write_text(text)
        with pytest.raises(SkipbenchError, match=message):
            Placement(str(bad))
    bad.write_text('{"": "cpu"}')
    with pytest.raises(SkipbenchError, match="a map file places every module itself"):
        Placement(str(bad), max_memory="cpu=1GB")
    with pytest.raises(SkipbenchError, match="--device cpu and --device-map: give one"):
        with placing(Placement(str(bad))):
            load_model("tiny-random", "cpu")


def test_the_command_line_runs_placed_and_writes_the_single_device_parquet(tiny_dirs, tmp_path):
    """`evaluate --device-map FILE.json` on a model folder: the same rows as without it, the placement in the manifest;
    a bad map, or --max-memory without a map, is one line and exit code 1, with no result file."""
    runner = CliRunner()
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(half_on_disk("llama")))
    common = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "3",
              "--max-new-tokens", "8", "--policy", "uniform:4", "--policy", "random-token:3"]
    # apart, and without resume: the placed run computes every part (a shared folder would reuse the first run's)
    one = runner.invoke(app, [*common, "--out", str(tmp_path / "one" / "one.parquet"), "--no-resume"])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, [*common, "--out", str(tmp_path / "two.parquet"), "--device-map", str(map_file),
                              "--no-resume"])
    assert two.exit_code == 0, two.output
    assert "0 finished part(s) reused" in " ".join(two.output.split())
    a, b = pd.read_parquet(tmp_path / "one" / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    keep = [c for c in a.columns if not c.endswith(("_s", "seconds")) and c not in ("run_id", "time", "tokens_per_s")]
    pd.testing.assert_frame_equal(a[keep], b[keep])
    manifest = json.loads((tmp_path / "two.json").read_text())
    assert manifest["model"]["placement"]["modules"]["model.layers.5"] == "disk"
    for extra, message in (([ "--device-map", str(tmp_path / "none.json")], "not a readable JSON file"),
                           (["--max-memory", "cpu=1GB"], "give --device-map too"),
                           (["--device-map", str(map_file), "--device", "cpu"], "give one")):
        bad = runner.invoke(app, [*common, "--out", str(tmp_path / "bad.parquet"), *extra])
        assert bad.exit_code == 1 and message in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
        assert not (tmp_path / "bad.parquet").exists()


LANE_POLICIES = ["full", "uniform:4", "random-token:3", "confidence:0.05", "angular:2", "flexidepth"]
LANE_DRAFTS = ["early-exit:2", "clasp:3", "del", "knapspec"]


@pytest.mark.lane
@pytest.mark.parametrize("device_first", [True, False])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_layers_placed_by_hand_on_two_devices_give_the_single_device_tokens(tokenizer, device, family, device_first,
                                                                            tmp_path, monkeypatch):
    """The GPU check's case (`pytest --device cuda -m lane`): the embedding and the first half of the layers on one
    device, the rest, the final norm and the head on the other (the device first, or the CPU first), each running
    where it sits (no accelerate hook), for static, per-token, threshold, calibrated and routed policies under both
    KV modes and for early-exit (its exit layer away from the final norm's device), CLaSp, DEL and KnapSpec drafts:
    the single-device tokens. On the CPU lane both halves are the CPU and the test is the plain run's."""
    if device.type == "cpu" and not device_first:
        pytest.skip("on the CPU lane both orders are the same run")
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache"))
    single = wrap_model(tiny_model(family, len(tokenizer)), tokenizer, f"tiny-{family}", device)
    model = tiny_model(family, len(tokenizer))
    stack = model.model.decoder if family == "opt" else model.model
    first, second = (device, torch.device("cpu")) if device_first else (torch.device("cpu"), device)
    model.to(second)
    stack.embed_tokens.to(first)
    for layer in stack.layers[: len(stack.layers) // 2]:
        layer.to(first)
    placed = wrap_model(model, tokenizer, f"tiny-{family}", None)
    assert placed.adapter.placed == (device.type != "cpu")  # two devices: the engine moves the stream between them
    ps = prompts(tokenizer, 3)
    for name in LANE_POLICIES:
        for kv_mode in ("fill", "none"):
            monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "single"))
            ref = generate(single, ps, policy(name, single, kv_mode), NEW, kv_mode)
            monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "placed"))  # its calibration computed, not read
            out = generate(placed, ps, policy(name, placed, kv_mode), NEW, kv_mode)
            assert out.tokens == ref.tokens and out.layers == ref.layers, (name, kv_mode)
    full = generate(single, ps, None, NEW).tokens
    for name in LANE_DRAFTS:
        draft = parse_policies(name, {"interval": "1"} if name == "clasp:3" else None, seed=1)[0].build(6, placed, draft=True)
        assert speculate(placed, ps, draft, Speculation(k=3), NEW).tokens == full, name


def test_each_rank_takes_its_own_gpus(monkeypatch, tmp_path):
    """--gpus-per-rank N under torchrun: rank r's GPUs are r N .. r N + N - 1, a map's indices are the rank's own, and
    a placement across ranks without it is refused (the GPU count is the machine's; here four are pretended)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Placement("auto", gpus_per_rank=2).gpus() == [2, 3]
    assert Placement("auto", max_memory="0=1GB,1=2GB,cpu=3GB", gpus_per_rank=2).memory() == {2: "1GB", 3: "2GB", "cpu": "3GB"}
    file = tmp_path / "map.json"
    file.write_text(json.dumps({"model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": "cpu"}))
    assert Placement(str(file), gpus_per_rank=2).file_map() == {"model.layers.0": 2, "model.layers.1": 3, "lm_head": "cpu"}
    with pytest.raises(SkipbenchError, match="needs --gpus-per-rank"):
        Placement("auto")
    with pytest.raises(SkipbenchError, match="rank 1 needs GPUs 3-5, this machine has 4"):
        Placement("auto", gpus_per_rank=3)


def test_bench_on_a_placement_says_what_its_speedups_compare(tiny_dirs, tmp_path):
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(half_on_disk("llama")))
    out = tmp_path / "bench.parquet"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs["llama"]), "--batch-sizes", "1", "--policy",
                                   "full,uniform:3", "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0",
                                   "--device-map", str(map_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "placed by --device-map" in " ".join(res.output.split()) and "same placement" in " ".join(res.output.split())
    assert json.loads(out.with_suffix(".json").read_text())["model"]["placement"]["layers"] == ["cpu"] * 6


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores


@pytest.mark.slow
def test_tensor_parallel_ranks_agree_with_one_process(tiny_dirs, tmp_path):
    """--tp 2 under torchrun (gloo): each rank holds half the heads; the logits are one process's (close in fp32), the
    greedy tokens and layer records equal, at full depth and under a per-token policy, and every rank took the same
    decisions and made the same number of all-reduces (row-wise projection calls) at every step."""
    from skipbench.engine.forward import Engine

    folder, out = str(tiny_dirs["llama"]), tmp_path / "ranks.json"
    res = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("tp_worker.py")), folder, str(out)], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["heads"] for r in ranks] == [2, 2] and [r["kv_heads"] for r in ranks] == [1, 1]  # of 4 and 2
    one = load_model(folder, "cpu", "float32")
    ps = [[5, 9, 14, 3, 22], [7, 7, 30], [11, 2, 8, 19]]
    from tp_worker import router

    for name in ("full", "random-token:3", "flexidepth"):  # the router decides from the hidden state
        ref = generate(one, ps, router(one) if name == "flexidepth" else make_policy(name, one.num_layers, one, seed=1),
                       8, "fill")
        for r in ranks:
            assert r[name]["tokens"] == ref.tokens and r[name]["layers"] == ref.layers, (name, r["rank"])
        assert ranks[0][name]["all_reduces"] == ranks[1][name]["all_reduces"]
        assert sum(ranks[0][name]["all_reduces"]) > 0
    full, skipping = (sum(ranks[0][n]["all_reduces"]) for n in ("full", "random-token:3"))
    assert skipping < full and any(len(rec) < 6 for row in ranks[0]["flexidepth"]["layers"] for rec in row)  # the skipped layers' products (and their all-reduces) were not run
    _, ref = Engine(one.adapter).prefill(torch.tensor([ps[0]]), torch.ones(1, 5, dtype=torch.bool), 8)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["logits"]), ref.logits[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_evaluate_with_tp_2_writes_the_single_process_parquet(tiny_dirs, tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2 -m skipbench evaluate --tp 2`: rank 0 writes the rows one process writes (tokens,
    scores, layers), no rank writes a part; a model without a plan, or --tp beside --device-map, is refused."""
    args = ["evaluate", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--split", "test", "--limit", "4",
            "--max-new-tokens", "8", "--policy", "uniform:4", "--policy", "random-token:3", "--policy", "angular:2,3", "-o",
            "calibration=3", "--batch-size", "2"]  # two calibrated points: one calibration, computed on every rank
    res = subprocess.run([*TORCHRUN, "-m", "skipbench", *args, "--tp", "2", "--out", str(tmp_path / "tp.parquet"),
                          "--no-resume"], env=dict(ENV, SKIPBENCH_CACHE=str(tmp_path / "cache-tp")), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(tmp_path.rglob("*rank*"))  # one share of the items: no rank wrote a part of its own
    monkeypatch.setenv("SKIPBENCH_CACHE", str(tmp_path / "cache-one"))  # its own calibration
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one" / "one.parquet"), "--no-resume"])
    assert one.exit_code == 0, one.output  # apart and without resume: computed, not read from the TP run's parts
    a, b = pd.read_parquet(tmp_path / "one" / "one.parquet"), pd.read_parquet(tmp_path / "tp.parquet")
    keep = [c for c in a.columns if not c.endswith(("_s", "seconds")) and c not in ("run_id", "time", "tokens_per_s")]
    pd.testing.assert_frame_equal(a[keep], b[keep], check_exact=False, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "tp.json").read_text())["model"]["placement"]["tp"] == 2
    for model, extra, message in ((tiny_dirs["opt"], [], "no tensor-parallel plan for 'opt'"),
                                  (tiny_dirs["llama"], ["--device-map", "auto"], "does not combine with --device-map")):
        bad = subprocess.run([*TORCHRUN, "-m", "skipbench", *args[:1], "--model", str(model), *args[3:], "--tp", "2",
                              *extra, "--out", str(tmp_path / "bad.parquet")], env=ENV, capture_output=True, text=True,
                             timeout=600)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
        assert not (tmp_path / "bad.parquet").exists()


def test_tp_outside_torchrun_is_one_line(tiny_dirs, tmp_path):
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dirs["llama"]), "--tp", "2", "--prompt", "hi"])
    assert res.exit_code == 1 and "runs under torchrun with 2 processes" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_tensor_parallel_refusals_that_need_no_second_process(monkeypatch, tiny_dirs, tokenizer):
    """Heads that do not split into N equal shards, and the strategies that cannot run sharded, are one line each."""
    from transformers import AutoConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = AutoConfig.from_pretrained(tiny_dirs["llama"])  # 4 attention heads, 2 key/value heads
    Placement(tp=2).tp_kwargs(config)
    config.num_key_value_heads = 3
    with pytest.raises(SkipbenchError, match="3 key/value heads do not divide into 2"):
        Placement(tp=2).tp_kwargs(config)
    with pytest.raises(SkipbenchError, match="does not combine with --device-map"):
        Placement("auto", tp=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SkipbenchError, match="--tp 2 runs under torchrun with 2 processes"):
        Placement(tp=2)
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny")
    lm.adapter.tp = 2  # what a sharded model's adapter says (a sharded model needs torchrun: the refusals need only this)
    with pytest.raises(SkipbenchError, match="KnapSpec chooses its draft from latencies"):
        parse_policies("knapspec", seed=1)[0].build(6, lm, draft=True)
    from skipbench.engine.forward import DraftHead

    with pytest.raises(SkipbenchError, match="--draft-vocab copies rows of the head"):
        DraftHead(lm.adapter, torch.arange(10))


def test_the_trainers_take_no_device_map_and_the_rest_do():
    from skipbench.cli.group import TRAINERS
    from typer.main import get_command

    root = get_command(app)
    for words in ("evaluate", "generate", "bench", "cosine", "lm-eval", "compare", "track", "plan", "flexidepth usage",
                  "route train", *TRAINERS):
        cmd = root
        for w in words.split():
            cmd = cmd.commands[w]
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert ("--device-map" in opts) == (words not in TRAINERS), words
        assert ("--tp" in opts) == (words in ("evaluate", "generate", "bench")), words


@pytest.mark.slow
def test_bench_with_tp_2_reports_the_share_of_collectives(tiny_dirs, tmp_path):
    out = tmp_path / "bench.parquet"
    res = subprocess.run([*TORCHRUN, "-m", "skipbench", "bench", "--model", str(tiny_dirs["llama"]), "--tp", "2",
                          "--policy", "full,uniform:3", "--batch-sizes", "1", "--max-new-tokens", "4", "--repeats", "1",
                          "--warmup", "0", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "collectives took" in " ".join((res.stdout + res.stderr).split())
    share = json.loads(out.with_suffix(".json").read_text())["collective_share"]
    assert 0 < share < 1
    assert set(pd.read_parquet(out)["variant"]) >= {"full", "uniform:3"}

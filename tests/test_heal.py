"""reverse:C and healing (`skipbench finetune --heal SPEC --heal-layers N`): the pruned model equals the plan, healing
trains only the head and the last N kept layers, and its folder is a plain model of C layers for transformers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import prompts, tiny_model
from skipbench.cli import app
from skipbench.engine import generate
from skipbench.models import load_model, wrap_model
from skipbench.models.loading import remove_layers
from skipbench.policies import make_policy


def test_reverse_keeps_the_first_c_layers_and_equals_the_smaller_model(tokenizer):
    lm = wrap_model(tiny_model("llama", len(tokenizer)), tokenizer, "tiny-llama")
    policy = make_policy("reverse:4", lm.num_layers)
    assert policy.executed_layers() == [0, 1, 2, 3] and policy.skips_statically()
    ps = prompts(tokenizer, 2)
    small = wrap_model(remove_layers(lm.model, [0, 1, 2, 3], share_weights=False), tokenizer, "small")
    assert generate(lm, ps, policy, 12, prompt_depth="policy").tokens == generate(small, ps, None, 12).tokens


def heal(tiny_dirs, out, *extra):
    return CliRunner().invoke(app, ["finetune", "--model", str(tiny_dirs["llama"]), "--dataset", "arith", "--limit", "8",
                                    "--val-limit", "2", "--steps", "2", "--batch-size", "2", "--eval-every", "1",
                                    "--lr", "1e-2", "--max-new-tokens", "4", "--out", str(out), *extra])


@pytest.mark.parametrize("plan,keep", [("reverse:4", [0, 1, 2, 3]), ("uniform:4", None)])
def test_healing_trains_the_head_and_the_last_kept_layers_only_and_writes_c_layers(tiny_dirs, tmp_path, plan, keep):
    res = heal(tiny_dirs, tmp_path / "run", "--heal", plan, "--heal-layers", "1")
    assert res.exit_code == 0, res.output
    folder = tmp_path / "run" / "last"  # after the last step (best may be the starting point on a random model)
    healed = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers
    assert healed.config.num_hidden_layers == 4 and len(healed.model.layers) == 4
    keep = keep or make_policy(plan, 6).executed_layers()
    original = load_file(tiny_dirs["llama"] / "model.safetensors")
    got = load_file(folder / "model.safetensors")
    trained = {"lm_head.weight", *(k for k in got if k.startswith("model.layers.3."))}
    for name, tensor in got.items():
        source = name
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            source = name.replace(f"model.layers.{i}.", f"model.layers.{keep[i]}.", 1)
        same = torch.equal(tensor, original[source])
        assert same != (name in trained), name  # everything else is the original's, the trained part moved
    # the folder runs in transformers as it does in skipbench at full depth
    lm = load_model(str(folder), "cpu", "float32")
    for p in prompts(lm.tokenizer, 2):
        theirs = healed.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert generate(lm, [p], None, 8).tokens[0] == theirs[0, len(p):].tolist()


@pytest.mark.parametrize("args,message", [
    (["--heal", "random-token:3"], "--heal takes a static plan that removes layers"),
    (["--heal", "full"], "--heal takes a static plan that removes layers"),
    (["--heal", "reverse:2", "--heal-layers", "3"], "--heal-layers 3 is more than the 2 layers"),
    (["--heal", "reverse:2", "--heal-layers", "-1"], "--heal-layers N >= 0"),
    (["--heal", "reverse:2", "--layer-dropout", "0.1"], "does not combine"),
    (["--heal", "reverse:2,uniform:3"], "names 2 policies; give one"),
])
def test_bad_healing_is_one_line_and_exit_1(tiny_dirs, tmp_path, args, message):
    res = heal(tiny_dirs, tmp_path / "run", *args)
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_a_tied_head_gets_a_copy_of_its_own_so_healing_leaves_the_embedding(tokenizer, tmp_path):
    tied = tiny_model("llama", len(tokenizer))
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    res = heal({"llama": tmp_path / "tied"}, tmp_path / "run", "--heal", "reverse:4", "--heal-layers", "1")
    assert res.exit_code == 0, res.output
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "last")
    assert not healed.config.tie_word_embeddings
    assert torch.equal(healed.model.embed_tokens.weight, tied.model.embed_tokens.weight)  # the embedding as it was
    assert not torch.equal(healed.lm_head.weight, tied.model.embed_tokens.weight)  # the head trained


@pytest.mark.parametrize("args,message", [
    (["--heal-layers", "2"], "give --heal"),
    (["--heal", "reverse:2", "-o", "calibration=4"], "no policy given takes it"),
    (["--heal", "clasp:3"], "--heal takes a static plan"),
])
def test_healing_options_without_their_plan_are_refused(tiny_dirs, tmp_path, args, message):
    res = heal(tiny_dirs, tmp_path / "run", *args)
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output

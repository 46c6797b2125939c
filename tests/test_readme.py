"""Every `skipbench` example in the README runs as written, in tiny form: on a tiny random model of the embedded
model's depth (30 layers, so every cost written there is valid), with small sizes (CAPS), in a temporary folder, in
the README's order (a later example reads what an earlier one wrote). An example marked `# hub` needs the model hub,
one marked `# after reproduce` the results of a real `make reproduce`: those are only checked to parse (their
command and options exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_model
from skipbench.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
# the tiny form: these options' values whatever the README says (only where the command takes the option)
CAPS = {"--limit": "4", "--steps": "2", "--max-new-tokens": "4", "--batch-sizes": "1", "--repeats": "1",
        "--warmup": "0", "--num-seeds": "1", "--train-limit": "8", "--eval-limit": "2", "--val-limit": "2",
        "--eval-every": "1", "--items": "300", "--big-items": "0", "--bootstrap": "20", "--per-category": "1",
        "--max-prompt-tokens": "64"}  # the tiny models have 1,024 positions: long prompts are cut
SPLIT_ALL_LIMIT = "40"  # a router needs train and validation items: `--split all` keeps more of them


def examples() -> list[str]:
    """The README's command lines that start with `skipbench`, continuation lines joined."""
    blocks = re.findall(r"```\n(.*?)```", README.read_text(), re.S)
    lines = [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith(("skipbench ", "torchrun "))]


def command_of(words: list[str]):
    import typer

    cmd, rest = typer.main.get_command(app), list(words)
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, len(words) - len(rest)


def tiny_form(argv: list[str], model: str) -> list[str]:
    cmd, depth = command_of(argv)
    takes = {o for p in cmd.params for o in getattr(p, "opts", [])}
    out, given = list(argv), set()
    for i, word in enumerate(out):
        if word in CAPS and i + 1 < len(out):
            out[i + 1] = CAPS[word]
        if word == "--model":
            out[i + 1] = model if not out[i + 1].startswith(("runs/", "results/")) else out[i + 1]
        given.add(word)
    if "--split" in given and out[out.index("--split") + 1] == "all" and "--limit" in given:
        out[out.index("--limit") + 1] = SPLIT_ALL_LIMIT
    extra = [] if {"--model", "--layers"} & given or "--model" not in takes else ["--model", model]
    for option, value in CAPS.items():
        # flexidepth train's --val-limit only sizes the held-out loss of --eval-every, which an example without it
        # does not measure (the command refuses it alone)
        held_out_only = option == "--val-limit" and argv[:2] == ["flexidepth", "train"] and "--eval-every" not in given
        if option in takes and option not in given and option not in ("--eval-every",) and not held_out_only:
            extra += [option, value]
    if argv[:1] == ["reproduce"]:
        extra += ["--dry-run"]
    if argv[:1] == ["compare"] and "--tasks" not in given:
        extra += ["--tasks", "skipbench_choice"]
    return out[:depth] + extra + out[depth:]


@pytest.fixture(scope="module")
def tiny30(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny30")
    tiny_model("llama", len(tokenizer), layers=30).save_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # an instruct model's
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_every_readme_example_runs_in_tiny_form(tiny30, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran, checked = [], []
    for line in examples():
        hub = line.endswith("# hub") or "# after reproduce" in line  # the hub, or a real reproduce's results
        argv = shlex.split(line.split("  #")[0].split(" # ")[0])
        if argv[0] == "torchrun":
            argv = argv[argv.index("skipbench"):]
        argv = argv[1:]
        if hub:  # no hub here: the command and its options must exist, nothing runs
            cmd, depth = command_of(argv)
            takes = {o for p in cmd.params for o in getattr(p, "opts", [])}
            assert {w for w in argv[depth:] if w.startswith("--")} <= takes, line
            checked.append(line)
            continue
        res = CliRunner().invoke(app, tiny_form(argv, tiny30))
        assert res.exit_code == 0, f"{line}\n{res.output}"
        assert "is now" not in res.stderr, f"{line} uses an old spelling: {res.stderr}"
        ran.append(line)
    assert len(ran) >= 20 and checked, (ran, checked)  # the hub and after-reproduce examples parsed, the others ran

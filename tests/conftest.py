"""Tiny random models built from configs (no download) and a tiny tokenizer trained on the spot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = [
    "Please calculate the sum of 99, 45 and 12.",
    "Copy the paragraph: Anna walked to the market in Lisbon on Monday.",
    "Summarize the text in one sentence. The river flooded the old town.",
    "Repeat the list 5 times: 12, 34, 56, 78.",
    "What is the product of 13, 27 and 41? Answer with a number.",
] * 4


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="the device of the device lane's tests (marked `lane`): cpu or "
                     "cuda (`pytest --device cuda -m lane` on a GPU machine)")


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device must be cpu or cuda[:N], got '{name}'") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu or cuda[:N], got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device here")


def pytest_collection_modifyitems(config, items):
    """On a device other than the CPU only the lane runs: the other tests build their inputs on the CPU."""
    if config.getoption("--device") != "cpu":
        off = pytest.mark.skip(reason="not in the device lane (marked `lane`); runs with --device cpu")
        for item in items:
            if "lane" not in item.keywords:
                item.add_marker(off)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the lane's tests build their models on (`--device`, default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(family: str, vocab: int, layers: int = 6):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, num_hidden_layers=layers, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if family == "opt":
        return AutoConfig.for_model(
            "opt", hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=1024, do_layer_norm_before=True, **common,
        )
    extra = {"qwen3": dict(head_dim=16), "mistral": dict(sliding_window=None), "qwen2": dict(use_sliding_window=False)}
    return AutoConfig.for_model(
        family, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, **extra.get(family, {}), **common,
    )


def tiny_model(family: str, vocab: int, layers: int = 6, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, layers), attn_implementation="sdpa")
    # random init gives near-uniform logits; a larger scale makes greedy choices well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dirs(tokenizer, tmp_path_factory):
    """Each family saved as a local model directory (for the CLI), keyed by family."""
    out = {}
    for family in ("llama", "qwen3", "opt"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family, len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


def prompts(tokenizer, n: int = 3) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in CORPUS[:n]]


def no_kv_router(folder: Path, layers: int = 6, hidden: int = 64) -> Path:
    """A FlexiDepth checkpoint trained without K/V for skipped tokens (`--no-kv`), written as `flexidepth train` does."""
    import json

    from safetensors.torch import save_file

    from skipbench.policies.flexidepth import FlexiDepth

    torch.manual_seed(0)
    flexi = FlexiDepth(hidden, layers, reduction=4, kv=False)
    with torch.no_grad():
        for r in flexi.routers.values():
            r.out.bias.fill_(0.0)  # G ~ 0.5 around tau: some tokens skip
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in flexi.state_dict().items()}, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps({"kind": "flexidepth", **flexi.config(), "alpha": 1.0}))
    return folder

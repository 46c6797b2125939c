"""`skipbench generate`: one prompt through the engine under a policy; text plus per-token layer records."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipbench.data.prompts import encode_prompt
from skipbench.engine import LAYERS_CONVENTION, Sampling, generate, resolve_kv_mode
from skipbench.policies import PolicySpec
from skipbench.engine.speculative import Speculation, speculate
from skipbench.policies.calibration import frequent_tokens
from skipbench.errors import SkipbenchError
from skipbench.models import load_model


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    prompt: str
    model: str
    policy: PolicySpec = field(default_factory=lambda: PolicySpec(name="full"))
    max_new_tokens: int = 64
    kv_mode: str = "auto"
    prompt_depth: str = "full"
    sampling: Sampling = field(default_factory=Sampling)
    device: str = "auto"
    dtype: str = "auto"
    draft: PolicySpec | None = None  # self-speculative decoding: this policy drafts, the full model verifies
    speculation: Speculation = field(default_factory=Speculation)


def run(cfg: GenerateConfig) -> dict:
    if cfg.draft is not None and cfg.policy.name != "full":
        raise SkipbenchError(f"--draft verifies with the full model; --policy must be full, got '{cfg.policy.label}'")
    if cfg.draft is not None and cfg.prompt_depth != "full":
        raise SkipbenchError("--draft runs the prompt at full depth (the verifier's); --prompt-depth must be full")
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.draft is not None:
        return _speculative(cfg, lm)
    policy = cfg.policy.build(lm.num_layers, lm)
    cfg.policy.check_kv_mode(resolve_kv_mode(cfg.kv_mode, policy.kv_mode, f"policy '{cfg.policy.label}'",
                                             policy.skips_statically()))
    ids = encode_prompt(lm.tokenizer, cfg.prompt)
    out = generate(lm, [ids], policy, cfg.max_new_tokens, cfg.kv_mode, cfg.sampling,
                   prompt_depth=cfg.prompt_depth)
    tokens = out.tokens[0]
    return {
        "model": cfg.model,
        "policy": policy.describe(),
        "num_layers": lm.num_layers,
        "kv_mode": out.kv_mode,
        "prompt_depth": cfg.prompt_depth,
        "prompt_tokens": len(ids),
        "text": lm.tokenizer.decode(tokens, skip_special_tokens=True),
        "token_ids": tokens,
        "layers_per_token": out.layers[0],
        "layers_convention": LAYERS_CONVENTION,
        "cost_mean": out.cost_mean(0) if out.layers[0] else None,
    }


def _speculative(cfg: GenerateConfig, lm) -> dict:
    draft = cfg.draft.check_draft().build(lm.num_layers, lm, draft=True)
    kv_mode = resolve_kv_mode(cfg.kv_mode, draft.kv_mode, f"draft '{cfg.draft.label}'")
    cfg.draft.check_kv_mode(kv_mode)
    ids = encode_prompt(lm.tokenizer, cfg.prompt)
    vocab = frequent_tokens(lm, cfg.speculation.draft_vocab) if cfg.speculation.draft_vocab else None
    out = speculate(lm, [ids], draft, cfg.speculation, cfg.max_new_tokens, kv_mode, cfg.sampling, vocab=vocab)
    tokens, s = out.tokens[0], out.speculation
    return {
        "model": cfg.model, "policy": "full", "num_layers": lm.num_layers, "kv_mode": out.kv_mode,
        "prompt_depth": "full", "prompt_tokens": len(ids),
        "text": lm.tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens,
        "layers_per_token": out.layers[0], "layers_convention": LAYERS_CONVENTION,
        "cost_mean": out.cost_mean(0) if out.layers[0] else None,
        "speculation": {"draft": cfg.draft.label, "speculate": cfg.speculation.label, **s.row(0),
                        "acceptance_prob": s.acceptance_prob(0), "round_k": s.round_k, "exit_layer": s.exit_layer},
    }


def summary(record: dict) -> str:
    """The one line shown under the generated text: the policy (or the draft and its acceptance) and the depth."""
    n = len(record["token_ids"])
    if record.get("speculation"):
        sp = record["speculation"]
        return (f"full depth, drafted by {sp['draft']} (K={sp['speculate']}) · {n} new tokens · acceptance "
                f"{sp['acceptance_rate']:.2f} · {sp['accepted_per_round']:.2f} accepted per round over {sp['rounds']} rounds")
    mean = record["cost_mean"]
    depth = f" · mean executed layers {mean:.2f} of {record['num_layers']}" if mean is not None else ""
    return f"{record['policy']} · {n} new tokens{depth}"

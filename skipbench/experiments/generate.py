"""`skipbench generate`: one prompt through the engine under a policy; text plus per-token layer records."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipbench.data.prompts import encode_prompt
from skipbench.engine import LAYERS_CONVENTION, Sampling, generate, resolve_kv_mode
from skipbench.policies import PolicySpec
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


def run(cfg: GenerateConfig) -> dict:
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    policy = cfg.policy.build(lm.num_layers, lm)
    cfg.policy.check_kv_mode(resolve_kv_mode(cfg.kv_mode, policy.kv_mode, f"policy '{cfg.policy.label}'"))
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

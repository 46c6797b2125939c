"""Who decides which layer runs for which token.

A policy is asked, for each decoder layer, which of the tokens being processed run it. Its
answer (a `Gate`) is `True` (every token runs the layer), `False` (no token does: the layer is
not touched at all) or a bool tensor of shape [batch, tokens]. Static plans answer with plain
bools, so skipping a layer costs nothing; per-token policies answer with tensors.
"""

from skipbench.policies.base import Gate, Policy, POLICIES, make_policy, parse_policy_spec
from skipbench.policies import static as _static  # noqa: F401  (registers the static policies)
from skipbench.policies import controller as _controller  # noqa: F401  (registers "controller")
from skipbench.policies import flexidepth as _flexidepth  # noqa: F401  (registers "flexidepth")

__all__ = ["Gate", "Policy", "POLICIES", "make_policy", "parse_policy_spec"]

"""Policy families behind one small contract (see ``policies.base``).

Imports torch only; never ``genrl`` or ``envs``.
"""

from genrl_policies.base import (
    POLICY_FAMILIES,
    PolicyLoadError,
    PolicyModule,
    check_detached,
    load_pretrained,
    record_map,
    resolve_family,
)
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy, GaussianRecord

# The other families import lazily through ``resolve_family`` / ``load_pretrained`` (or directly:
# ``from genrl_policies.pmoe import PMOEPolicy``, ``policies.policyflow``, ``policies.fpo``,
# ``policies.diffusion``), so ``import genrl_policies`` stays light.

__all__ = [
    "POLICY_FAMILIES",
    "GaussianConfig",
    "GaussianPolicy",
    "GaussianRecord",
    "PolicyLoadError",
    "PolicyModule",
    "check_detached",
    "load_pretrained",
    "record_map",
    "resolve_family",
]

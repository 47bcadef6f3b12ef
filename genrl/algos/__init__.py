"""Algorithms, one file each, readable top-down.

Importing the package registers the text-to-image algorithms with ``grpo.GRPO``, and behaviour
cloning (``--algo bc``) and SAC (``--algo sac``) with the control algorithms.
"""

from genrl.algos import bc, flow_grpo, g2rpo, sac  # noqa: F401

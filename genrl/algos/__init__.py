"""Algorithms, one file each, readable top-down.

Importing the package registers the text-to-image algorithms with ``grpo.GRPO``.
"""

from genrl.algos import flow_grpo, g2rpo  # noqa: F401

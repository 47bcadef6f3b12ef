"""Data shipped with genrl, installed as ``genrl_assets``: the digits text-to-image model
(``digits-sd3/``, a diffusers pipeline folder) and the README's figures (not packaged)."""

from pathlib import Path

DIGITS_MODEL_DIR = Path(__file__).resolve().parent / "digits-sd3"

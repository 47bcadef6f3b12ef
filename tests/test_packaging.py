"""What a non-editable install contains: genrl-prefixed packages and the digits model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_prefixed_packages_and_the_digits_model(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=600, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("genrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("genrl-")}
    assert tops == {"genrl", "genrl_envs", "genrl_policies", "genrl_assets"}  # no bare envs/ or policies/
    digits = {n for n in names if n.startswith("genrl_assets/digits-sd3/")}
    local = {f"genrl_assets/{p.relative_to(ROOT / 'assets')}" for p in (ROOT / "assets" / "digits-sd3").rglob("*") if p.is_file()}
    assert digits == local and "genrl_assets/digits-sd3/transformer/diffusion_pytorch_model.safetensors" in digits
    assert not any(n.endswith(".png") for n in names)  # figures stay in the repository

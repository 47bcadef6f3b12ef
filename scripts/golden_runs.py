"""Golden runs: short runs of every algorithm x family, reduced to hashes, so a refactor can prove
that it changed no behaviour (same commands -> bitwise-identical parameters, logs, checkpoints).

    python scripts/golden_runs.py --write      # record tests/golden/<cpu>.json (before a refactor)
    python scripts/golden_runs.py              # compare with the record for this CPU (after it)

Float rounding depends on the CPU's vector unit (MKL picks kernels per instruction set), so a
record holds the CPU capability it was made on; ``tests/test_golden.py`` compares against the
record of the running CPU, and elsewhere checks that two runs in one process hash the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"
TINY_PPO = {"n_steps": 64, "n_minibatches": 2, "n_epochs": 2}
CONTROL: dict[str, dict[str, Any]] = {  # name -> config overrides (env Pendulum-v1 unless given)
    "ppo-gaussian": {"policy": "gaussian"},
    "ppo-pmoe": {"policy": "pmoe", "policy_config": {"n_experts": 2, "hidden_sizes": [16]}},
    "ppo-policyflow": {"policy": "policyflow", "policy_config": {"hidden_sizes": [16], "n_steps": 2}},
    "ppo-fpo": {"policy": "fpo", "policy_config": {"hidden_sizes": [16], "n_steps": 2, "n_mc": 2}},
    "ppo-diffusion": {"policy": "diffusion", "policy_config": {"hidden_sizes": [16], "n_denoising_steps": 2}},
    "gorl-stage-boundary": {
        "policy": "gorl",
        "policy_config": {"encoder_hidden": [16], "decoder_hidden": [16], "decoder_steps": 2},
        "gorl": {"stage_fractions": [0.5, 0.5], "refine_steps": 64, "decoder_epochs": 2, "decoder_batch_size": 32},
    },  # fmt: skip
}
IMAGE: dict[str, dict[str, Any]] = {
    "flow-grpo": {"algo": "flow-grpo"},
    "g2rpo-guard-gdpo": {"algo": "g2rpo", "reward": "digit=1,jpeg_compressibility=0.1", "grpo": {"ratio": "guard", "reward_aggregation": "gdpo"}},  # fmt: skip
}


def cpu_key() -> str:
    return f"{torch.backends.cpu.get_cpu_capability()}-torch{torch.__version__.split('+')[0]}"


def digest_run(run: Path) -> dict[str, str]:
    """sha256 of every tensor of the final checkpoint and of progress.csv without time columns."""
    from genrl.checkpoint import checkpoint_steps

    final = run / "checkpoints" / str(checkpoint_steps(run)[-1])
    out: dict[str, str] = {}
    for f in sorted(final.rglob("*.safetensors")):
        h = hashlib.sha256()
        for key, t in sorted(load_file(str(f)).items()):
            h.update(key.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[str(f.relative_to(final))] = h.hexdigest()
    rows = (run / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, k in enumerate(header) if not k.startswith("time/")]
    text = "\n".join(",".join(r.split(",")[i] for i in keep if i < len(r.split(","))) for r in rows)
    out["progress.csv"] = hashlib.sha256(text.encode()).hexdigest()
    return out


def run_all(root: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    from genrl.config import config_from_dict, merge
    from genrl.trainer import train

    torch.set_num_threads(1)
    results = {}
    for name, over in CONTROL.items():
        if names and name not in names:
            continue
        data = merge({"env": {"env_id": "Pendulum-v1"}, "ppo": TINY_PPO,
                      "run": {"total_steps": 256, "seed": 7, "out": str(root / name), "eval_episodes": 1, "progress": False}}, over)  # fmt: skip
        results[name] = digest_run(train(config_from_dict(data)))
    for name, over in IMAGE.items():
        if names and name not in names:
            continue
        data = merge({"env": "t2i", "model": "digits", "reward": "digit",
                      "grpo": {"n_steps": 3, "group_size": 2, "prompts_per_iter": 2, "lora_rank": 2, "eval_n_steps": 2},
                      "run": {"total_steps": 16, "seed": 7, "out": str(root / name), "eval_episodes": 1, "progress": False}}, over)  # fmt: skip
        results[name] = digest_run(train(config_from_dict(data)))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="record tests/golden/<cpu>.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run_all(Path(tmp))
    path = GOLDEN_DIR / f"{cpu_key()}.json"
    if args.write:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {path}")
        return 0
    if not path.is_file():
        print(f"no record for this CPU ({path.name}); record one with --write before changing code")
        return 1
    want = json.loads(path.read_text())
    diff = [f"{run}/{f}" for run in want for f in want[run] if got.get(run, {}).get(f) != want[run][f]]
    print("identical" if not diff else "DIFFERENT: " + ", ".join(diff))
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())

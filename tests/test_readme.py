"""Every code block of the README runs, with tiny budgets, so the README cannot drift from the code.

* ``toml`` blocks whose first line is ``# NAME`` are written to NAME first (``--config`` uses them);
* ``bash`` blocks: each ``genrl`` command runs through ``genrl.cli.main`` in one scratch folder
  (so ``runs/...`` paths chain from block to block), with ``--steps`` shrunk and small network /
  rollout settings appended; ``python scripts/...`` commands run in the slow suite with their
  budgets shrunk; the install and test commands are what CI itself runs, so they are skipped;
* ``python`` blocks run with their budgets shrunk (``SHRINK``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

CONTROL_TINY = ["--set", "ppo.n_steps=64", "--set", "ppo.n_minibatches=2", "--set", "ppo.n_epochs=1", "--eval-episodes", "1", "--no-progress"]
T2I_TINY = ["--set", "grpo.n_steps=2", "--set", "grpo.group_size=2", "--set", "grpo.prompts_per_iter=2", "--set", "grpo.eval_n_steps=2",
            "--set", "run.eval_episodes=1", "--set", "grpo.lora_rank=2", "--no-progress"]  # fmt: skip
SHRINK = [  # python blocks: (pattern, replacement)
    (r'"n_steps": 1024', '"n_steps": 64, "n_minibatches": 2, "n_epochs": 1'),
    (r'"total_steps": 20_000', '"total_steps": 256'),
    (r"range\(100\)", "range(5)"),
    (r"episodes=5", "episodes=1"),
    (r'"algo_config": \{"n_steps": 1000\}', '"algo_config": {"n_steps": 64}'),
]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """Shell lines with backslash continuations joined and comments dropped."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def tiny_genrl(argv: list[str]) -> list[str]:
    args = list(argv)
    if args[0] == "compose":  # few episodes, a coarse grid
        for flag, value in (("--val-episodes", "2"), ("--test-episodes", "2")):
            if flag in args:
                args[args.index(flag) + 1] = value
        return [*args, "--grid-step", "0.5"] if "--search" in args else args
    if args[0] == "demos" and "--episodes" in args:
        args[args.index("--episodes") + 1] = "10"
        return args
    if args[0] != "train":
        return args
    if "--resume" in args:
        if "--steps" in args:
            i = args.index("--steps")
            args[i + 1] = "256"  # longer than the tiny run it extends
        return [*args, "--no-progress"]
    t2i = "t2i" in args
    if "--n-envs" in args:
        i = args.index("--n-envs")
        args[i + 1] = str(min(int(args[i + 1]), 2))
    n_envs = int(args[args.index("--n-envs") + 1]) if "--n-envs" in args else 1
    steps = "16" if t2i else str(64 * n_envs * (6 if "gorl" in args else 2))  # GoRL: every stage gets an iteration
    if "--steps" in args:
        args[args.index("--steps") + 1] = steps
    else:
        args += ["--steps", steps]
    if "gorl" in args:
        args += ["--set", "gorl.refine_steps=64", "--set", "gorl.decoder_epochs=1", "--save-every", "0", "--eval-every", "0"]
    for flag in ("--save-every", "--eval-every"):  # budgets of the full run: keep the tiny one whole
        while flag in args[:-2] and args.count(flag) > 1:
            i = args.index(flag)
            del args[i : i + 2]
    if "sac" in args:  # SAC: a short warm-up, small batches
        return [*args, "--set", "algo_config.learning_starts=32", "--set", "algo_config.steps_per_iter=64", "--set", "algo_config.batch_size=32",
                "--eval-episodes", "1", "--no-progress"]  # fmt: skip
    if "--preset" in args:  # the preset's own network, smaller rollouts
        return [*args, "--set", "ppo.n_steps=64", "--set", "ppo.n_minibatches=2", "--set", "ppo.n_epochs=1", "--eval-episodes", "1", "--no-progress"]
    return [*args, *(T2I_TINY if t2i else CONTROL_TINY)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shell_commands() -> list[str]:
    return [c for b in blocks("bash") for c in commands(b)]


def test_readme_has_the_two_fresh_machine_commands() -> None:
    cmds = shell_commands()
    assert any(c.startswith("python3 -m venv .venv") and "genrl train" in c for c in cmds)
    test_cmd = next(c for c in cmds if c.startswith("python3 -m venv .venv") and "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()  # CI runs it verbatim


def test_readme_genrl_commands_and_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from genrl import cli

    monkeypatch.chdir(tmp_path)
    for block in blocks("toml"):
        first = block.splitlines()[0]
        if first.startswith("# "):
            (tmp_path / first[2:].strip()).write_text(block)
    ran = 0
    for cmd in shell_commands():
        parts = [p for p in re.split(r"\s*&&\s*", cmd)]
        for part in parts:
            argv = shlex.split(part)
            if argv[0].endswith("genrl"):
                tiny = tiny_genrl(argv[1:])
                code = cli.main(tiny)
                assert code == 0, (part, tiny, capsys.readouterr().err)
                ran += 1
            elif argv[0] == "torchrun" and "cuda" not in argv:  # the CPU (gloo) launch; the GPU ones need GPUs
                at = argv.index("-m")
                launcher = [a for a in argv[1:at] if not a.startswith("--master_port")]
                cmd_tiny = [sys.executable, "-m", "torch.distributed.run", *launcher, "--master_port", str(_free_port()), "-m", "genrl",
                            *tiny_genrl(argv[at + 2 :]), "--out", str(tmp_path / "ddp-run")]  # fmt: skip
                done = subprocess.run(cmd_tiny, cwd=tmp_path, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, (part, done.stderr[-3000:])
                assert (tmp_path / "ddp-run" / "final").is_dir()
                ran += 1
    assert ran >= 10
    for block in blocks("python"):
        if "from diffusers" in block or "load_finetuned" in block:
            continue  # the text-to-image snippets run in test_readme_image_snippets (they need a run)
        code = block
        for pattern, repl in SHRINK:
            code = re.sub(pattern, repl, code)
        run_as_module(code)


def run_as_module(code: str) -> None:
    """exec a snippet as a real module (dataclasses and type hints look their module up)."""
    import types

    module = types.ModuleType("readme_snippet")
    sys.modules["readme_snippet"] = module
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
    finally:
        sys.modules.pop("readme_snippet", None)


def test_readme_image_snippets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the README's paths are relative to the repository
    from genrl import cli

    image_cmds = [c for c in shell_commands() if "--env t2i" in c and c.startswith("genrl train")]
    assert image_cmds
    assert cli.main(tiny_genrl(shlex.split(image_cmds[0])[1:])) == 0
    for block in blocks("python"):
        if "from diffusers" in block or "load_finetuned" in block:
            run_as_module(block)


@pytest.mark.slow
def test_readme_script_commands_run(tmp_path: Path) -> None:
    shrink = [(r"--steps \d+", "--steps 4096"), (r"--seeds( \d+)+", "--seeds 1"), (r"--images \d+", "--images 64"),
              (r"--episodes \d+", "--episodes 2"), (r"--out \S+", f"--out {tmp_path}/out"), (r"--assets \S+", "")]  # fmt: skip
    for cmd in shell_commands():
        if not cmd.startswith("python scripts/"):
            continue
        for pattern, repl in shrink:
            cmd = re.sub(pattern, repl, cmd)
        argv = shlex.split(cmd)
        subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, check=True, timeout=1200)

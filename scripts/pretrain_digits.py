"""Pretrain the tiny digits text-to-image flow model shipped in ``assets/digits-sd3``.

    python scripts/pretrain_digits.py                # the shipped base, under-trained on purpose (~3.5 min)
    python scripts/pretrain_digits.py --steps 3000 --lr 1e-3 --out runs/digits-sd3-full   # fully trained (~25 min)

A ``StableDiffusion3Pipeline`` built by ``envs.digits.build_digits_pipeline`` (SD3 transformer,
two small CLIP text encoders and a small T5 encoder, pixel space with the identity
``pixel_vae``) is trained from scratch on sklearn's 8x8 digits with SD3's rectified-flow loss:
x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, sigma from a logit-normal(0, 1), timestep
= 1000 sigma. The transformer and the three text encoders are trained jointly; each image gets a
random template prompt for its label ("a handwritten 7", "the digit seven", ...), replaced by ""
10% of the time (for classifier-free guidance). Each step encodes the prompts with 8 T5 tokens
(the model's own length, ``genrl_t2i.json``), or with diffusers' default of 256 a quarter of the
time, so that a plain ``pipe(prompt)`` draws digits too.

Every ``--eval-every`` steps the model samples 16 images per prompt "a handwritten {d}" with a
10-step Euler ODE sampler at CFG 1.0 and 8 T5 tokens (the shipped sampling defaults) and ``DigitClassifier``
scores them: acc (argmax == prompted digit), p (mean p(prompted digit)), pmax (mean max class
probability: how digit-like the samples are, whatever the digit).

The default ``--steps`` deliberately stops early: the base draws digit-like images but the
prompted digit only part of the time, leaving headroom for RL fine-tuning with the classifier
reward. Measured (defaults: batch 128, AdamW lr 3e-4, 2 CPU threads shared with another job,
~2 it/s):

    step    50   100   150   200   250   300   350   400   450   500   550   600
    acc   .075  .056  .094  .075  .100  .169  .244  .425  .656  .688  .775  .819
    p     .084  .075  .080  .084  .098  .140  .207  .350  .532  .579  .676  .715
    pmax  .496  .516  .533  .511  .516  .519  .535  .579  .689  .722  .781  .794

Until ~300 steps the samples are digit-like but ignore the prompt; the text conditioning then
comes in. At 600 steps diffusers' default of 256 T5 tokens scores acc .788 / p .698 against
.819 / .715 with the model's own 8, so both lengths work. ``--steps 3000 --lr 1e-3`` trains a
fully converged model.

Writes ``save_pretrained`` (safetensors, ~3 MB) + ``genrl_t2i.json`` (sampling defaults) to
``--out``. Bitwise reproducible: fixed seeds, fixed data order, 2 threads, deterministic algorithms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from genrl_envs.digits import (  # noqa: E402
    SAMPLING_DEFAULTS,
    T5_TOKENS,
    DigitClassifier,
    all_digit_prompts,
    build_digits_pipeline,
    digit_prompts,
    load_digits,
)

DEFAULT_STEPS = 450  # at lr 3e-4: acc .66, mean p(prompted digit) .53 (see the module docstring)


def encode(pipe, prompts: list[str], cfg: bool = False, t5_tokens: int = T5_TOKENS):
    """``pipe.encode_prompt`` as SD3 calls it, with ``t5_tokens`` T5 tokens."""
    return pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=cfg, max_sequence_length=t5_tokens)


@torch.no_grad()
def sample(pipe, prompts: list[str], n_per_prompt: int, steps: int, guidance: float, seed: int, t5_tokens: int = T5_TOKENS) -> torch.Tensor:
    """Euler ODE sampling from sigma=1 (noise) to 0: (len(prompts) * n_per_prompt, C, H, W) in [-1, 1]."""
    cfg = guidance > 1.0
    pe, npe, pp, npp = encode(pipe, [p for p in prompts for _ in range(n_per_prompt)], cfg, t5_tokens)
    if cfg:
        pe, pp = torch.cat([npe, pe]), torch.cat([npp, pp])
    cfg_t = pipe.transformer.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts) * n_per_prompt, cfg_t.in_channels, cfg_t.sample_size, cfg_t.sample_size, generator=gen)
    pipe.scheduler.set_timesteps(steps)
    sigmas = pipe.scheduler.sigmas
    for i in range(steps):
        xin = torch.cat([x, x]) if cfg else x
        t = (sigmas[i] * 1000).expand(xin.shape[0])
        v = pipe.transformer(hidden_states=xin, timestep=t, encoder_hidden_states=pe, pooled_projections=pp).sample
        if cfg:
            vu, vc = v.chunk(2)
            v = vu + guidance * (vc - vu)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x.clamp(-1.0, 1.0)


def evaluate(pipe, clf: DigitClassifier, n_per_prompt: int = 16, steps: int = 10, guidance: float = 1.0, seed: int = 1234, t5_tokens: int = T5_TOKENS):
    """(acc, mean p(prompted digit), mean max p, samples) over the prompts "a handwritten {d}", d = 0..9."""
    x = sample(pipe, digit_prompts(), n_per_prompt, steps, guidance, seed, t5_tokens)
    probs = clf.predict_proba((x + 1.0) / 2.0)
    target = torch.arange(10).repeat_interleave(n_per_prompt)
    acc = (probs.argmax(1) == target).float().mean().item()
    p = probs[torch.arange(len(target)), target].mean().item()
    return acc, p, probs.max(1).values.mean().item(), x


def ascii_digits(x: torch.Tensor) -> str:
    """One row of 8x8 images (C=1, [-1, 1]) as text."""
    ramp = " .:-=+*#%@"
    rows = []
    for r in range(x.shape[-2]):
        cells = ["".join(ramp[int((v + 1) / 2 * 9.999)] * 2 for v in img[0, r].tolist()) for img in x]
        rows.append("  ".join(cells))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default: the shipped, under-trained base)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--prompt-dropout", type=float, default=0.1)
    ap.add_argument("--long-t5-fraction", type=float, default=0.25, help="share of steps encoding prompts with 256 T5 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="assets/digits-sd3")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits()
    clf = DigitClassifier()
    pipe = build_digits_pipeline(seed=args.seed, with_t5=True, with_pixel_vae=True)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    print(
        f"params: transformer {sum(p.numel() for p in pipe.transformer.parameters()):,}, "
        f"text encoders {sum(p.numel() for m in modules[1:] for p in m.parameters()):,}; "
        f"data {tuple(images.shape)}; setup {time.perf_counter() - t_start:.1f}s",
        flush=True,
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    # All training prompts: index 0 is "" (dropout), then every template variant of every digit.
    variants = [all_digit_prompts(d) for d in range(10)]
    prompts = [""] + [p for v in variants for p in v]
    table = torch.arange(1, len(prompts)).view(10, -1)  # (digit, variant) -> prompt index

    def evaluate_and_print(step: int, t5_tokens: int = T5_TOKENS) -> torch.Tensor:
        for m in modules:
            m.eval()
        t0 = time.perf_counter()
        acc, p, pmax, x = evaluate(pipe, clf, t5_tokens=t5_tokens)
        print(f"eval step {step:5d}, {t5_tokens} T5 tokens: acc {acc:.3f}  p {p:.3f}  pmax {pmax:.3f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        for m in modules:
            m.train()
        return x

    order = torch.randperm(len(images), generator=gen)
    pos = 0
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, y = images[idx], labels[idx]
        b = len(idx)

        variant = torch.randint(table.shape[1], (b,), generator=gen)
        prompt_idx = table[y, variant]
        prompt_idx[torch.rand(b, generator=gen) < args.prompt_dropout] = 0
        t5_tokens = 256 if torch.rand((), generator=gen) < args.long_t5_fraction else T5_TOKENS
        pe, _, pp, _ = encode(pipe, prompts, t5_tokens=t5_tokens)  # every prompt once (61), gathered below: gradients reach the encoders
        pe, pp = pe[prompt_idx], pp[prompt_idx]

        sigma = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pe, pooled_projections=pp).sample
        loss = torch.nn.functional.mse_loss(v, noise - x0)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        if step % 50 == 0 or step == 1:
            el = time.perf_counter() - t_train
            print(f"step {step:5d}  loss {loss.item():.4f}  {step / el:.1f} it/s  {el:.0f}s", flush=True)
        if step % args.eval_every == 0 and step != args.steps:
            evaluate_and_print(step)
    train_s = time.perf_counter() - t_train
    evaluate_and_print(args.steps, t5_tokens=256)
    x = evaluate_and_print(args.steps)
    print("one sample per prompt 'a handwritten {d}', d = 0..9:")
    print(ascii_digits(x[::16]))

    out = Path(args.out)
    if out.exists() and (out / "model_index.json").exists():
        shutil.rmtree(out)  # a previous pipeline: no stale components left behind
    for m in modules:
        m.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "genrl_t2i.json").write_text(json.dumps(SAMPLING_DEFAULTS, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 1e6:.2f} MB); training {train_s:.0f}s, total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()

"""envs/digits.py: prompts, the small CLIP BPE tokenizer, the digit classifier and the SD3-shaped
digits pipeline (pixel space and with a tiny VAE), and the shipped ``assets/digits-sd3`` base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from genrl_envs.digits import (  # noqa: E402
    DIGIT_WORDS,
    T5_TOKENS,
    DigitClassifier,
    all_digit_prompts,
    build_digits_pipeline,
    digit_prompts,
    load_clip_tokenizer,
    load_digits,
    load_digits_pipeline,
    parse_digit,
    pixel_vae,
    t5_tokenizer,
    write_clip_bpe_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "digits-sd3"


def test_prompts_and_parse_digit() -> None:
    assert digit_prompts() == [f"a handwritten {d}" for d in range(10)]
    for d in range(10):
        assert parse_digit(f"a handwritten {d}") == d
        assert all(parse_digit(p) == d for p in all_digit_prompts(d))
    assert parse_digit("The Digit SEVEN") == 7
    assert parse_digit("a 3 that looks like a four") == 4  # the last mention wins
    assert parse_digit("12") == 2
    assert parse_digit("someone drew a cat") is None  # "one" inside a word does not count
    assert parse_digit("") is None


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    write_clip_bpe_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    tok = load_clip_tokenizer(tmp_path)
    v = len(tok)
    assert v == len(vocab) and 520 < v < 700
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (v - 2, v - 1, v - 1)
    assert tok.model_max_length == 16

    ids = tok("a handwritten 7", padding="max_length", max_length=16).input_ids
    assert ids[:5] == [v - 2, vocab["a</w>"], vocab["handwritten</w>"], vocab["7</w>"], v - 1]
    assert ids[5:] == [v - 1] * 11
    for w in DIGIT_WORDS + tuple("0123456789"):
        assert tok(w).input_ids == [v - 2, vocab[w + "</w>"], v - 1]
    # unknown words and punctuation fall back to (merged) byte tokens, never to unk
    ids = tok("a zebra, Ünïcode!").input_ids
    assert ids[0] == v - 2 and ids[-1] == v - 1 and len(ids) > 6
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra , ünïcode !"


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return DigitClassifier()


def test_load_digits() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0 and set(labels.tolist()) == set(range(10))


def test_classifier(classifier: DigitClassifier) -> None:
    images, labels = load_digits()
    x = (images + 1) / 2
    assert (classifier.predict(x) == labels).float().mean() >= 0.95
    for batch in (x[:5], torch.nn.functional.interpolate(x[:5], size=32, mode="nearest").repeat(1, 3, 1, 1)):
        p = classifier.predict_proba(batch)
        assert p.shape == (5, 10) and p.dtype == torch.float32
        assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5) and (p >= 0).all()
        assert torch.equal(p.argmax(1), classifier.predict(x[:5]))
    assert torch.equal(classifier.predict_proba(x[:5]), classifier.predict_proba(x[:5]))  # deterministic
    # off-manifold images get no confident class
    assert classifier.predict_proba(torch.rand(8, 3, 32, 32)).max() < 0.6
    with pytest.raises(ValueError):
        classifier.predict_proba(torch.rand(2, 2, 8, 8))


@pytest.mark.parametrize("with_vae", [False, True])
def test_pipeline_shapes(with_vae: bool) -> None:
    pipe = build_digits_pipeline(seed=0, with_vae=with_vae)
    assert pipe.text_encoder_3 is None and (pipe.vae is not None) == with_vae
    pe, npe, pp, npp = pipe.encode_prompt(
        ["a handwritten 7", "the digit seven", "a zebra"],
        None,
        None,
        device="cpu",
        do_classifier_free_guidance=True,
        max_sequence_length=0,
    )
    assert pe.shape == npe.shape == (3, 16, 64) and pp.shape == npp.shape == (3, 64)
    c, s = (4, 4) if with_vae else (1, 8)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (c, c, s)
    x = torch.randn(3, c, s, s)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=x, timestep=torch.tensor([999.0, 500.0, 1.0]), encoder_hidden_states=pe, pooled_projections=pp).sample
        assert v.shape == x.shape and torch.isfinite(v).all()
        if with_vae:
            img = pipe.vae.decode(v / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
            assert img.shape == (3, 1, 8, 8)
    # same seed, same weights
    again = build_digits_pipeline(seed=0, with_vae=with_vae)
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values()))


def test_save_load_round_trip_with_vae(tmp_path: Path) -> None:
    pipe = build_digits_pipeline(seed=1, with_vae=True)
    pipe.save_pretrained(tmp_path)
    loaded = load_digits_pipeline(tmp_path)
    assert loaded.vae is not None and loaded.text_encoder_3 is None and loaded.tokenizer.model_max_length == 16
    x = torch.randn(1, 1, 8, 8)
    kw = dict(device="cpu", do_classifier_free_guidance=False, max_sequence_length=0)
    with torch.no_grad():
        assert torch.equal(pipe.vae.encode(x).latent_dist.mean, loaded.vae.encode(x).latent_dist.mean)
        pa = pipe.encode_prompt("a handwritten 3", None, None, **kw)
        pb = loaded.encode_prompt("a handwritten 3", None, None, **kw)
        assert torch.equal(pa[0], pb[0]) and torch.equal(pa[2], pb[2])
        z, t = torch.randn(1, 4, 4, 4), torch.tensor([300.0])
        va = pipe.transformer(hidden_states=z, timestep=t, encoder_hidden_states=pa[0], pooled_projections=pa[2]).sample
        vb = loaded.transformer(hidden_states=z, timestep=t, encoder_hidden_states=pb[0], pooled_projections=pb[2]).sample
        assert torch.allclose(va, vb, atol=1e-6)  # same weights; summation order may differ


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="assets/digits-sd3 not built")
def test_shipped_base_runs_in_diffusers_verbatim() -> None:
    """The README's snippet: from_pretrained with no components passed by hand, pipe(prompt).images[0]."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSET))
    assert pipe.vae is not None and pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None
    assert pipe.transformer.config.in_channels == 1 and pipe.transformer.config.sample_size == 8
    sidecar = json.loads((ASSET / "genrl_t2i.json").read_text())
    assert sidecar == {"resolution": 8, "max_sequence_length": T5_TOKENS, "guidance_scale": 1.0, "num_inference_steps": 10, "prompts": "digits"}
    assert pipe.tokenizer_3.model_max_length == T5_TOKENS
    size = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    assert size < 4_000_000
    image = pipe("a handwritten 3", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (8, 8) and image.mode == "L"
    # images = latents / 2 + 0.5 (the identity VAE), the model's own T5 length and diffusers' default agree in shape
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    for length in (T5_TOKENS, 256):
        latents = pipe(digit_prompts()[:2], output_type="latent", max_sequence_length=length, generator=torch.Generator().manual_seed(1), **kw).images
        images = pipe(digit_prompts()[:2], output_type="pt", max_sequence_length=length, generator=torch.Generator().manual_seed(1), **kw).images
        assert latents.shape == images.shape == (2, 1, 8, 8)
        assert torch.allclose(images, (latents / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_pixel_vae_is_the_identity(tmp_path: Path) -> None:
    vae = pixel_vae()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert (vae.decode(x).sample - x).abs().max() < 1e-5
        posterior = vae.encode(x).latent_dist
        assert (posterior.mean - x).abs().max() < 1e-5 and posterior.std.max() < 1e-6
    vae.save_pretrained(tmp_path)
    from diffusers import AutoencoderKL

    with torch.no_grad():
        assert (AutoencoderKL.from_pretrained(tmp_path).decode(x).sample - x).abs().max() < 1e-5
    three = pixel_vae(channels=3)
    rgb = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert (three.decode(rgb).sample - rgb).abs().max() < 1e-5


def test_t5_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = t5_tokenizer()
    ids = tok(["a handwritten 7", "the digit seven"], padding="max_length", max_length=T5_TOKENS, truncation=True).input_ids
    assert all(len(row) == T5_TOKENS for row in ids)
    assert ids[0][:4] == [tok.convert_tokens_to_ids("▁a"), tok.convert_tokens_to_ids("▁handwritten"), tok.convert_tokens_to_ids("▁7"), tok.eos_token_id]
    assert ids[0][4:] == [tok.pad_token_id] * 4
    tok.save_pretrained(tmp_path)
    from transformers import T5TokenizerFast

    assert T5TokenizerFast.from_pretrained(tmp_path)(["the digit seven"]).input_ids == tok(["the digit seven"]).input_ids


def test_import_is_light() -> None:
    code = "import sys, genrl_envs.digits; print(sorted(m for m in ('diffusers', 'transformers', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

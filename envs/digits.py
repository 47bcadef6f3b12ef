"""A tiny, offline text-to-image task on scikit-learn's 8x8 handwritten digits.

Everything a Stable Diffusion 3 fine-tuning loop touches, at toy size and without downloads:

- prompts ("a handwritten 7", "the digit seven", ...) and ``parse_digit`` to read the digit back;
- ``write_clip_bpe_tokenizer``: a real (small) CLIP byte-level BPE vocabulary for those words;
- ``t5_tokenizer``: a small T5 (Unigram) tokenizer with one piece per prompt word;
- ``pixel_vae``: an ``AutoencoderKL`` whose decoder and encoder are the identity (to ~3e-6 on
  [-1, 1]), so a pixel-space model runs through diffusers' own ``pipe(prompt).images``;
- ``build_digits_pipeline``: a randomly initialised ``diffusers.StableDiffusion3Pipeline`` made of
  the genuine classes (``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``, two
  ``CLIPTextModelWithProjection`` encoders, optionally a ``T5EncoderModel``) working in pixel
  space (the "latent" is the 1x8x8 image in [-1, 1]; no VAE or the identity ``pixel_vae``), or
  with a tiny learned ``AutoencoderKL`` for tests;
- ``load_digits`` (the data, scaled to [-1, 1]) and ``DigitClassifier`` (an RBF SVM, the reward).

``scripts/pretrain_digits.py`` trains the base model shipped in ``assets/digits-sd3``.

Heavy libraries (diffusers, transformers, scikit-learn) are imported inside the functions, so
importing this module costs nothing. Never imports ``genrl`` or ``policies``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusion3Pipeline

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Prompt templates; ``{}`` takes the digit as a numeral ("7") or a word ("seven").
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a handwritten {}",
    "the digit {}",
    "a drawing of the number {}",
    "{}",
)

#: Image side in pixels (sklearn digits are 8x8), the CLIP context length and the T5 length the
#: shipped model samples with (it is also trained at diffusers' default of 256, see
#: scripts/pretrain_digits.py).
IMAGE_SIZE = 8
MAX_TOKENS = 16
T5_TOKENS = 8

#: Sampling defaults for the shipped model (written next to it as ``genrl_t2i.json``).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "resolution": IMAGE_SIZE,
    "max_sequence_length": T5_TOKENS,
    "guidance_scale": 1.0,
    "num_inference_steps": 10,
    "prompts": "digits",
}

_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b|(\d)", re.IGNORECASE)


def digit_prompts(template: str = "a handwritten {}") -> list[str]:
    """The built-in RL prompt set: ``template`` filled with the numerals 0..9 (10 prompts)."""
    return [template.format(d) for d in range(10)]


def all_digit_prompts(digit: int) -> list[str]:
    """Every template variant for one digit, numeral and word (``2 * len(PROMPT_TEMPLATES)``)."""
    return [t.format(x) for t in PROMPT_TEMPLATES for x in (str(digit), DIGIT_WORDS[digit])]


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt asks for: its last numeral ("7") or digit word ("seven"); None if none."""
    matches = list(_DIGIT_RE.finditer(prompt))
    if not matches:
        return None
    word, numeral = matches[-1].groups()
    return int(numeral) if numeral is not None else DIGIT_WORDS.index(word.lower())


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_words() -> list[str]:
    """The words given their own BPE tokens: every word of the templates plus the digit words."""
    words: list[str] = []
    for text in [*PROMPT_TEMPLATES, *DIGIT_WORDS]:
        for w in re.findall(r"[a-z]+", text.lower()):
            if w not in words:
                words.append(w)
    return words


def write_clip_bpe_tokenizer(out_dir: str | Path, words: Iterable[str] | None = None) -> None:
    """Write a small CLIP BPE vocabulary (``vocab.json`` + ``merges.txt``) to ``out_dir``.

    Vocabulary: the 256 byte characters, the same with ``</w>``, one token per left-to-right merge
    building each word of ``words`` (default ``tokenizer_words()``), then ``<|startoftext|>`` and
    ``<|endoftext|>`` (the last two ids). Any text still tokenizes, falling back to byte tokens.
    """
    words = tokenizer_words() if words is None else [w.lower() for w in words]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    byte_encoder = bytes_to_unicode()
    for word in words:
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            left = left + right
            if merge not in merges:
                merges.append(merge)
                vocab.append(left)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_clip_tokenizer(tokenizer_dir: str | Path) -> Any:
    """``transformers.CLIPTokenizer`` from a ``vocab.json`` + ``merges.txt`` folder (16 tokens)."""
    from transformers import CLIPTokenizer

    d = Path(tokenizer_dir)
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=MAX_TOKENS)


def t5_tokenizer(words: Iterable[str] | None = None) -> Any:
    """A small ``transformers`` T5 tokenizer (SentencePiece-style Unigram over "▁"-prefixed pieces):
    ``<pad>`` 0, ``</s>`` 1 (appended, as T5 does), ``<unk>`` 2, one piece per word of ``words``
    (default ``tokenizer_words()`` and the numerals), then single characters, so any lower-case
    text tokenizes; other characters become ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = [*tokenizer_words(), *map(str, range(10))] if words is None else [w.lower() for w in words]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words] + [("▁", -2.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=T5_TOKENS)


#: The constant channels of ``pixel_vae``: large enough that GroupNorm's statistics hardly see
#: the image (relative error mean(x^2) / (2 K^2)), small enough for float32 sums.
_PIXEL_VAE_K = 1024.0


def pixel_vae(channels: int = 1, sample_size: int = IMAGE_SIZE) -> Any:
    """An ``AutoencoderKL`` that is the identity: ``decode(z) = z`` and ``encode(x).mean = x`` to
    within ~3e-6 on [-1, 1] (posterior std e^-15), scaling 1, shift 0, no downsampling.

    It lets diffusers' pipelines run a pixel-space model unchanged (their ``images`` are then
    ``z / 2 + 0.5``, genrl's pixel-space decode). Each coder is conv_in -> identity resnets ->
    GroupNorm -> SiLU -> conv_out, with conv_in writing the channels (x, -x, K, -K): the group's
    mean is 0 and its std ~K / sqrt(2) whatever x is, GroupNorm's scale K / sqrt(2) restores x,
    and conv_out takes silu(x) - silu(-x) = x exactly. Every resnet's last conv is zero.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4 * channels,),
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=channels,
        sample_size=sample_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    k = _PIXEL_VAE_K
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder, n_out in ((vae.encoder, 2 * channels), (vae.decoder, channels)):
            for c in range(channels):  # group c holds channels 4c .. 4c+3 = (x_c, -x_c, K, -K)
                coder.conv_in.weight[4 * c, c, 1, 1], coder.conv_in.weight[4 * c + 1, c, 1, 1] = 1.0, -1.0
                coder.conv_in.bias[4 * c + 2], coder.conv_in.bias[4 * c + 3] = k, -k
                coder.conv_out.weight[c, 4 * c, 1, 1], coder.conv_out.weight[c, 4 * c + 1, 1, 1] = 1.0, -1.0
            coder.conv_norm_out.weight.fill_(k / 2**0.5)
            if n_out > channels:  # the encoder's log-variance channels
                coder.conv_out.bias[channels:] = -30.0
        for module in vae.modules():  # resnets keep only their skip path; GroupNorms stay well defined
            if isinstance(module, torch.nn.GroupNorm) and module.weight.abs().sum() == 0:
                module.weight.fill_(1.0)
    return vae.eval()


# ----------------------------------------------------------------------------- pipeline


def build_digits_pipeline(
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    with_vae: bool = False,
    with_pixel_vae: bool = False,
    with_t5: bool = False,
    sample_size: int = IMAGE_SIZE,
    text_width: int = 32,
    num_layers: int = 4,
    attention_head_dim: int = 16,
    num_attention_heads: int = 4,
) -> "StableDiffusion3Pipeline":
    """A randomly initialised, SD3-shaped ``StableDiffusion3Pipeline`` for ``sample_size``-pixel images.

    Two ``CLIPTextModelWithProjection`` encoders (width ``text_width``, 2 layers) share one small
    CLIP BPE tokenizer (written to a temporary folder unless ``tokenizer_dir`` holds one). With
    ``with_t5`` a 2-layer ``T5EncoderModel`` of the joint width and ``t5_tokenizer()``; without,
    no T5 (encode prompts with ``max_sequence_length=0``). Without a learned VAE the transformer
    works on the 1-channel image itself (``sample_size`` x ``sample_size``, values in [-1, 1]),
    with no VAE or, ``with_pixel_vae``, the identity ``pixel_vae()``; with ``with_vae=True`` a
    tiny 1-channel ``AutoencoderKL`` (4 latent channels, downsampling 2) is added and the
    transformer runs on its ``sample_size // 2`` latents. Modules in eval mode, as
    ``from_pretrained`` returns them. Deterministic in ``seed``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_clip_bpe_tokenizer(tmp)
            tokenizer = load_clip_tokenizer(tmp)
    else:
        tokenizer = load_clip_tokenizer(tokenizer_dir)
    v = len(tokenizer)
    assert tokenizer.bos_token_id == v - 2 and tokenizer.eos_token_id == v - 1, "bos/eos must be the last two ids"

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=v,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=v - 2,
        eos_token_id=v - 1,
        pad_token_id=v - 1,
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=text_width,
    )
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = t5_tokenizer()
        t5_config = T5Config(
            vocab_size=len(tokenizer_3),
            d_model=2 * text_width,
            d_kv=16,
            d_ff=4 * text_width,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
        text_encoder_3 = T5EncoderModel(t5_config)

    if with_vae and with_pixel_vae:
        raise ValueError("with_vae and with_pixel_vae exclude each other")
    vae = pixel_vae(1, sample_size) if with_pixel_vae else None
    channels, size = 1, sample_size
    if with_vae:
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=sample_size,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.0,
            shift_factor=0.0,
        )
        channels, size = vae.config.latent_channels, sample_size // 2

    transformer = SD3Transformer2DModel(
        sample_size=size,
        patch_size=2,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=attention_head_dim * num_attention_heads,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=max(size // 2, 1),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        if module is not None:
            module.eval()  # as from_pretrained returns them
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def load_digits_pipeline(path: str | Path) -> "StableDiffusion3Pipeline":
    """``StableDiffusion3Pipeline.from_pretrained`` of a saved digits pipeline, offline; the
    components saved as missing (``[null, null]`` in model_index.json, e.g. the VAE) passed as None."""
    from diffusers import StableDiffusion3Pipeline

    index = json.loads((Path(path) / "model_index.json").read_text())
    missing = {k: None for k, v in index.items() if v == [None, None]}
    return StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True, **missing)


# ----------------------------------------------------------------------------- data + reward


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 digits: images (N, 1, 8, 8) float32 in [-1, 1] (x / 8 - 1) and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(data.target.astype(np.int64))


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) images in [0, 1] (C = 1 or 3, any size) -> (B, 64) features on the data's 0..16 scale:
    grayscale by channel mean, area-resized to 8x8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0.0, 1.0).mean(dim=1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.adaptive_avg_pool2d(x, IMAGE_SIZE)
    return (x * 16.0).reshape(x.shape[0], -1).numpy().astype(np.float64)


class DigitClassifier:
    """An RBF SVM (``SVC(probability=True)``) fitted on all of sklearn's digits at construction (<1 s).

    ``predict_proba(images)`` takes float images (B, C, H, W) in [0, 1] (1 or 3 channels, any size;
    values outside are clipped) and returns class probabilities (B, 10) on the images' device.
    Deterministic. Far-off-manifold images (blank, noise) get spread-out probabilities (max ~0.2-0.3)
    rather than a confident class, which makes p(prompted digit) a sensible reward. (sklearn's
    replacement, ``CalibratedClassifierCV(SVC())``, is used only where ``probability=`` is gone: it
    is confident on noise.)
    """

    def __init__(self, seed: int = 0) -> None:
        import warnings

        from sklearn.svm import SVC

        images, labels = load_digits()
        features = to_digit_features((images + 1.0) / 2.0)
        try:  # libsvm's pairwise-coupled Platt probabilities (deprecated in sklearn 1.9)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.model = SVC(probability=True, random_state=seed).fit(features, labels.numpy())
        except TypeError:  # sklearn without SVC(probability=...): one-vs-rest sigmoid calibration
            from sklearn.calibration import CalibratedClassifierCV

            self.model = CalibratedClassifierCV(SVC(random_state=seed), ensemble=False).fit(features, labels.numpy())

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 10) float32 probabilities (rows sum to 1)."""
        p = self.model.predict_proba(to_digit_features(images))
        return torch.from_numpy(p.astype(np.float32)).to(images.device)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B,) int64 predicted digits (argmax of ``predict_proba``)."""
        return self.predict_proba(images).argmax(dim=1)

"""Image rewards: a registry of ``(images, prompts) -> Tensor[B]`` callables.

``images`` is a float tensor (B, C, H, W) in [0, 1] (C = 1 or 3), ``prompts`` a list of B strings.

Built in:
    digit                  p(prompted digit) under a classifier fitted on scikit-learn's digits
    digit_correct          1 if the classifier's top class is the prompted digit, else 0
    jpeg_compressibility   -(JPEG size in kB), DDPO's compressibility reward
    jpeg_incompressibility +(JPEG size in kB)
    brightness             mean pixel value
Plug-ins:
    clip:DIR               a CLIP-style scorer from a local folder (transformers ``CLIPModel``):
                           logit_scale * cos(image, prompt); PickScore is this with its weights
    module:function        any importable callable ``(images, prompts) -> scores``
    path/to/file.py:function
and ``register_reward(name)`` for factories in your own code.

``parse_reward_spec("digit=1,jpeg_compressibility=0.1")`` gives ``{name: weight}``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

RewardFn = Callable[[Tensor, list[str]], Tensor]

#: name -> factory(argument after "name:" or None, device) -> RewardFn
REWARDS: dict[str, Callable[[str | None, str], RewardFn]] = {}


class RewardError(ValueError):
    """An unknown or unusable reward."""


def register_reward(name: str, *, takes_arg: bool = False) -> Callable:
    """Decorator: ``@register_reward("mine") def factory(arg, device) -> RewardFn``; with
    ``takes_arg`` the reward is written ``mine:ARG`` (e.g. ``clip:DIR``), otherwise an argument
    is refused (``digit:1`` is almost always a mistyped weight, ``digit=1``)."""

    def deco(factory: Callable[[str | None, str], RewardFn]) -> Callable[[str | None, str], RewardFn]:
        REWARDS[name] = factory
        if takes_arg:
            _TAKES_ARG.add(name)
        return factory

    return deco


_TAKES_ARG: set[str] = set()


def parse_reward_spec(spec: str | dict[str, float] | list[str]) -> dict[str, float]:
    """``"a=1,b=0.5"`` / ``["a", "b=0.5"]`` / ``{"a": 1}`` -> ``{name: weight}`` (weight 1 by default)."""
    if isinstance(spec, dict):
        out = {str(k): float(v) for k, v in spec.items()}
    else:
        items = [s for part in ([spec] if isinstance(spec, str) else spec) for s in str(part).split(",")]
        out = {}
        for item in (i.strip() for i in items):
            if not item:
                continue
            name, weight = item, 1.0
            if "=" in item:
                head, tail = item.rsplit("=", 1)
                try:
                    name, weight = head.strip(), float(tail)
                except ValueError:
                    raise RewardError(f"reward weight in '{item}' is not a number") from None
            out[name] = weight
    if not out:
        raise RewardError("no reward given (e.g. --reward digit or --reward digit=1,jpeg_compressibility=0.1)")
    return out


def make_reward(name: str, device: str = "cpu") -> RewardFn:
    """Build the reward called ``name`` (see the module docstring for the forms)."""
    key, _, arg = name.partition(":")
    if key in REWARDS:
        if arg and key not in _TAKES_ARG:
            raise RewardError(f"reward '{name}': '{key}' takes no ':' argument; weights are written {key}={arg}")
        if not arg and key in _TAKES_ARG:
            raise RewardError(f"reward '{key}' needs an argument: {key}:ARG")
        return REWARDS[key](arg or None, device)
    if arg and (key.endswith(".py") or "/" in key):
        return _from_file(Path(key), arg)
    if arg:
        try:
            module = importlib.import_module(key)
        except ImportError as exc:
            raise RewardError(f"reward '{name}': cannot import module '{key}' ({exc})") from None
        fn = getattr(module, arg, None)
        if not callable(fn):
            raise RewardError(f"reward '{name}': '{key}' has no callable '{arg}'")
        return _checked(fn, name)
    raise RewardError(f"unknown reward '{name}'; valid: {', '.join(sorted(REWARDS))}, clip:DIR, module:function, file.py:function")


def _from_file(path: Path, attr: str) -> RewardFn:
    if not path.is_file():
        raise RewardError(f"reward file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"genrl_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward file {path} has no callable '{attr}'")
    return _checked(fn, f"{path}:{attr}")


def _checked(fn: Callable, name: str) -> RewardFn:
    """Wrap a user callable: its output becomes a float tensor of shape (B,) or a clear error."""

    def reward(images: Tensor, prompts: list[str]) -> Tensor:
        out = torch.as_tensor(fn(images, prompts), dtype=torch.float32).reshape(-1)
        if out.shape[0] != images.shape[0]:
            raise RewardError(f"reward '{name}' returned {out.shape[0]} scores for {images.shape[0]} images")
        return out

    return reward


def _to_uint8(images: Tensor) -> "list":
    """(B,C,H,W) in [0,1] -> list of HxWxC (or HxW) uint8 numpy arrays."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [a[..., 0] if a.shape[-1] == 1 else a for a in arr]


@register_reward("digit")
def _digit(arg: str | None, device: str) -> RewardFn:
    from genrl_envs.digits import DigitClassifier, parse_digit

    clf = DigitClassifier()

    def reward(images: Tensor, prompts: list[str]) -> Tensor:
        targets = _targets(prompts, parse_digit)
        probs = clf.predict_proba(images.detach().float().cpu())
        return probs[torch.arange(len(prompts)), targets]

    return reward


@register_reward("digit_correct")
def _digit_correct(arg: str | None, device: str) -> RewardFn:
    from genrl_envs.digits import DigitClassifier, parse_digit

    clf = DigitClassifier()

    def reward(images: Tensor, prompts: list[str]) -> Tensor:
        targets = _targets(prompts, parse_digit)
        return (clf.predict_proba(images.detach().float().cpu()).argmax(dim=1) == targets).float()

    return reward


def _targets(prompts: list[str], parse: Callable[[str], int | None]) -> Tensor:
    out = []
    for p in prompts:
        d = parse(p)
        if d is None:
            raise RewardError(f"digit reward: prompt {p!r} names no digit (use e.g. 'a handwritten 7')")
        out.append(d)
    return torch.tensor(out)


def _jpeg_kb(images: Tensor) -> Tensor:
    from PIL import Image

    sizes = []
    for a in _to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes)


@register_reward("jpeg_compressibility")
def _jpeg_compressibility(arg: str | None, device: str) -> RewardFn:
    return lambda images, prompts: -_jpeg_kb(images)


@register_reward("jpeg_incompressibility")
def _jpeg_incompressibility(arg: str | None, device: str) -> RewardFn:
    return lambda images, prompts: _jpeg_kb(images)


@register_reward("brightness")
def _brightness(arg: str | None, device: str) -> RewardFn:
    return lambda images, prompts: images.detach().float().mean(dim=(1, 2, 3)).cpu()


@register_reward("clip", takes_arg=True)
def _clip(arg: str | None, device: str) -> RewardFn:
    """CLIP-style prompt-image score from a local folder (e.g. PickScore's or any CLIP's weights)."""
    if not arg:
        raise RewardError("the clip reward needs a local model folder: clip:/path/to/clip")
    path = Path(arg)
    if not (path / "config.json").is_file():
        raise RewardError(f"clip reward: {path} is not a transformers model folder (no config.json)")
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(str(path))

    @torch.no_grad()
    def reward(images: Tensor, prompts: list[str]) -> Tensor:
        from PIL import Image

        pil = [Image.fromarray(a).convert("RGB") for a in _to_uint8(images)]
        inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True).to(device)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu()

    return reward


class RewardSet:
    """Several weighted rewards evaluated together; each one is logged on its own."""

    def __init__(self, spec: str | dict[str, float] | list[str], device: str = "cpu") -> None:
        self.weights = parse_reward_spec(spec)
        self.fns = {name: make_reward(name, device) for name in self.weights}

    def __call__(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """``{name: scores (B,)}`` for every reward; non-finite scores are an error."""
        if len(prompts) != images.shape[0]:
            raise RewardError(f"{images.shape[0]} images but {len(prompts)} prompts")
        out = {}
        for name, fn in self.fns.items():
            r = fn(images, prompts).float().reshape(-1)
            if not torch.isfinite(r).all():
                raise RewardError(f"reward '{name}' returned non-finite scores")
            out[name] = r
        return out

    def total(self, scores: dict[str, Tensor]) -> Tensor:
        return sum(self.weights[k] * scores[k] for k in self.weights)  # type: ignore[return-value]

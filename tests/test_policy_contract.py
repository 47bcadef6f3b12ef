"""The policy contract (policies.base), checked for every registered family with default configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from genrl_policies.base import (
    FORMAT_VERSION,
    POLICY_FAMILIES,
    PolicyLoadError,
    PolicyModule,
    load_pretrained,
    record_map,
    resolve_family,
)
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy

OBS, ACT, B = 5, 3, 7
FAMILIES = sorted(POLICY_FAMILIES)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(family: str, seed: int = 0) -> PolicyModule:
    torch.manual_seed(seed)
    policy = resolve_family(family)(OBS, ACT)
    randomise_(policy, seed + 100)  # move parameters off the near-zero init heads
    return policy


def randomise_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def observations(seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(B, OBS, generator=gen(seed), dtype=dtype)


def tensor_fields(record) -> dict[str, torch.Tensor]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def test_registry_is_not_empty() -> None:
    assert len(FAMILIES) >= 2  # the cross-family load test needs a second family
    for name in FAMILIES:
        assert resolve_family(name).family == name
    with pytest.raises(ValueError, match="valid choices"):
        resolve_family("no-such-family")


# -- act / record ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_act_shapes_and_record(family: str, deterministic: bool) -> None:
    policy = make(family)
    action, record = policy.act(observations(), deterministic=deterministic, generator=gen(2))
    assert action.shape == (B, ACT)
    assert not action.requires_grad
    assert dataclasses.is_dataclass(record) and not isinstance(record, type)
    assert type(record).__dataclass_params__.frozen
    first = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, first, None)
    fields = tensor_fields(record)
    assert fields
    for name, value in fields.items():
        assert isinstance(value, torch.Tensor), name
        assert not value.requires_grad and value.grad_fn is None, name
        assert value.shape[0] == B, (name, tuple(value.shape))
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_log_ratio_is_exactly_zero_after_act(family: str, deterministic: bool) -> None:
    policy = make(family)
    obs = observations()
    _, record = policy.act(obs, deterministic=deterministic, generator=gen(3))
    lr = policy.log_ratio(obs, record)
    assert lr.shape[0] == B and lr.ndim in (1, 2)
    assert torch.equal(lr, torch.zeros_like(lr))
    # and it moves once the parameters do
    randomise_(policy, 4, scale=0.05)
    assert not torch.equal(policy.log_ratio(obs, record), torch.zeros_like(lr))


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_reproducibility(family: str) -> None:
    policy, obs = make(family), observations()
    a1, r1 = policy.act(obs, generator=gen(5))
    a2, r2 = policy.act(obs, generator=gen(5))
    a3, _ = policy.act(obs, generator=gen(6))
    assert torch.equal(a1, a2)
    for name, value in tensor_fields(r1).items():
        assert torch.equal(value, getattr(r2, name)), name
    assert not torch.equal(a1, a3)


# -- save / load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family: str, tmp_path: Path) -> None:
    policy, obs = make(family), observations()
    policy.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(policy) and loaded.config == policy.config
    sd, sd_loaded = policy.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_loaded[k]), k
    a, _ = policy.act(obs, deterministic=True, generator=gen(7))
    b, _ = loaded.act(obs, deterministic=True, generator=gen(7))
    assert torch.equal(a, b)
    assert type(load_pretrained(tmp_path, family=family)) is type(policy)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_foreign_family_raises(family: str, tmp_path: Path) -> None:
    make(family).save_pretrained(tmp_path)
    other = next(f for f in FAMILIES if f != family)
    with pytest.raises(PolicyLoadError, match=f"'{family}'"):
        load_pretrained(tmp_path, family=other)


def _one_line_naming(exc: pytest.ExceptionInfo, filename: str) -> None:
    msg = str(exc.value)
    assert filename in msg, msg
    assert "\n" not in msg, msg


@pytest.mark.parametrize("family", FAMILIES)
def test_load_corrupt_config_raises(family: str, tmp_path: Path) -> None:
    make(family).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"family": "gauss')  # truncated JSON
    with pytest.raises(PolicyLoadError) as exc:
        load_pretrained(tmp_path)
    _one_line_naming(exc, "config.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_truncated_weights_raises(family: str, tmp_path: Path) -> None:
    make(family).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyLoadError) as exc:
        load_pretrained(tmp_path)
    _one_line_naming(exc, "model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_load_missing_file_raises(family: str, missing: str, tmp_path: Path) -> None:
    make(family).save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(PolicyLoadError) as exc:
        load_pretrained(tmp_path)
    _one_line_naming(exc, missing)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_other_format_version_raises(family: str, tmp_path: Path) -> None:
    make(family).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    meta = json.loads(cfg_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["family"] == family
    meta["format_version"] = FORMAT_VERSION + 1
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(PolicyLoadError, match="format_version") as exc:
        load_pretrained(tmp_path)
    _one_line_naming(exc, "config.json")


# -- input checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(B, OBS + 1), (OBS,)])
def test_bad_obs_shape_raises(family: str, shape: tuple[int, ...]) -> None:
    policy = make(family)
    with pytest.raises(ValueError, match=rf"\(B, {OBS}\)"):
        policy.act(torch.zeros(shape))


@pytest.mark.parametrize("family", FAMILIES)
def test_log_ratio_rejects_record_with_grad(family: str) -> None:
    policy, obs = make(family), observations()
    _, record = policy.act(obs, generator=gen(8))
    leaky = record_map(lambda x: x.clone().requires_grad_(x.is_floating_point()), record)
    assert any(v.requires_grad for v in tensor_fields(leaky).values())
    with pytest.raises(RuntimeError, match="requires grad"):
        policy.log_ratio(obs, leaky)


@pytest.mark.parametrize("family", FAMILIES)
def test_record_map_indexes_every_field(family: str) -> None:
    policy, obs = make(family), observations()
    _, record = policy.act(obs, generator=gen(9))
    idx = torch.tensor([4, 0, 2])
    sub = record_map(lambda x: x[idx], record)
    assert type(sub) is type(record)
    for name, value in tensor_fields(record).items():
        assert torch.equal(getattr(sub, name), value[idx]), name
        assert getattr(sub, name).shape[0] == 3
    # the indexed record is a valid behaviour record for the indexed observations (float64: a
    # different batch size may change float32 matmul rounding, so this is close, not bitwise)
    policy64, obs64 = policy.double(), obs.double()
    _, rec64 = policy64.act(obs64, generator=gen(9))
    lr = policy64.log_ratio(obs64[idx], record_map(lambda x: x[idx], rec64))
    torch.testing.assert_close(lr, torch.zeros_like(lr), rtol=0, atol=1e-12)


# -- Gaussian regularizer --------------------------------------------------------------------------
@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_gaussian_regularizer_is_entropy(state_dependent_std: bool) -> None:
    torch.manual_seed(0)
    policy = GaussianPolicy(OBS, ACT, GaussianConfig(state_dependent_std=state_dependent_std)).double()
    randomise_(policy, 10)
    obs = observations(dtype=torch.float64)
    _, record = policy.act(obs, generator=gen(11))
    mean, log_std = policy.distribution(obs)
    std = log_std.exp().expand_as(mean)
    if state_dependent_std:  # per-sample stds differ, so the entropy differs per sample
        assert not torch.allclose(std[0], std[1])
    expected = Normal(mean, std).entropy().sum(-1)
    got = policy.regularizer(obs, record)
    assert got.shape == (B,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

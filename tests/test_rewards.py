"""The reward registry, config syntax, composition, non-finite handling, custom rewards and JPEG.

Model-based rewards are in test_rewards_models.py, the HTTP reward in test_rewards_remote.py.
"""

from __future__ import annotations

import io
import logging
import math
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from PIL import Image

from orw_diffusers.errors import ConfigError
from orw_diffusers.rewards import (
    REWARDS,
    CompositeReward,
    RewardError,
    RewardSpec,
    build_reward,
    clean_scores,
    parse_reward_spec,
    register_reward,
)

torch.set_num_threads(1)

BUILT_INS = {
    "clip_score",
    "clip_zero_shot",
    "hpsv2",
    "aesthetic",
    "pickscore",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "remote_http",
    "digit_even",
    "digit_in",
}


@pytest.fixture
def user_rewards(tmp_path):
    """A user reward file, referred to as ``<path>:<function>``."""
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent("""
        import torch

        def brightness(images, prompts, gain=1.0):
            return gain * images.mean(dim=(1, 2, 3))

        def prompt_length(images, prompts):
            return torch.tensor([float(len(p)) for p in prompts])

        def nan_first_two(images, prompts):
            scores = images.mean(dim=(1, 2, 3)).clone()
            scores[:2] = float("nan")
            return scores

        def with_inf(images, prompts):
            scores = images.mean(dim=(1, 2, 3)).clone()
            scores[-1] = float("inf")
            return scores

        def all_nan(images, prompts):
            return torch.full((images.shape[0],), float("nan"))

        def wrong_length(images, prompts):
            return torch.zeros(images.shape[0] + 1)
    """)
    )
    return str(path)


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- registry and config syntax ------------------------------------------------------------------


def test_registry_has_every_built_in_and_importing_is_cheap():
    assert BUILT_INS <= set(REWARDS)
    code = (
        "import sys, orw_diffusers.rewards; print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_name_is_a_config_error_listing_known_names():
    with pytest.raises(ConfigError) as info:
        parse_reward_spec({"clip_score": 1.0, "clip_scor": 0.5})
    message = str(info.value)
    assert "'clip_scor'" in message and "\n" not in message
    for name in ("clip_score", "pickscore", "jpeg_compressibility", "remote_http"):
        assert name in message


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"clip_score": "high"}, "weight"),
        ({"clip_score": float("nan")}, "weight"),
        ([{"name": "clip_score", "wieght": 1.0}], "unknown field"),
        ([{"name": "clip_score", "kwargs": [1]}], "kwargs"),
        ([{"weight": 1.0}], "'name'"),
        (3, "must be a name"),
        ({}, "must be a name"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("missing_file.py:fn", "does not exist"),
    ],
)
def test_bad_specs_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_reward_spec(spec)


def test_parse_forms():
    assert parse_reward_spec("jpeg_compressibility") == [RewardSpec("jpeg_compressibility", 1.0, {})]
    assert parse_reward_spec({"clip_score": 1, "jpeg_compressibility": 0.1}) == [
        RewardSpec("clip_score", 1.0),
        RewardSpec("jpeg_compressibility", 0.1),
    ]
    specs = parse_reward_spec([{"name": "digit_in", "weight": 2, "kwargs": {"digits": [1, 3]}}, "clip_score"])
    assert specs == [RewardSpec("digit_in", 2.0, {"digits": [1, 3]}), RewardSpec("clip_score", 1.0)]


def test_register_reward_and_placement_arguments():
    seen = {}

    def factory(device="cpu", dtype=torch.float32, batch_size=32, offset=0.0):
        seen.update(device=device, dtype=dtype, batch_size=batch_size)
        return lambda images, prompts: images.mean(dim=(1, 2, 3)) + offset

    register_reward("test_offset_brightness", factory)
    try:
        reward = build_reward(
            [{"name": "test_offset_brightness", "kwargs": {"offset": 2.0}}],
            device="cpu",
            dtype="bfloat16",
            batch_size=3,
        )
        images = _images()
        out = reward(images, ["p"] * 4)
        torch.testing.assert_close(out.rewards, images.mean(dim=(1, 2, 3)) + 2.0)
        assert seen == {"device": torch.device("cpu"), "dtype": torch.bfloat16, "batch_size": 3}
        # a spec's kwargs override the placement per reward
        build_reward([{"name": "test_offset_brightness", "kwargs": {"batch_size": 7}}], batch_size=3)
        assert seen["batch_size"] == 7
    finally:
        REWARDS.pop("test_offset_brightness")
    with pytest.raises(ValueError):
        register_reward("a:b", factory)


def test_digit_rewards_get_only_the_device(monkeypatch):
    """digit_even / digit_in are lazily imported from rewards/digits.py; a stand-in module here."""
    calls = []
    fake = types.ModuleType("orw_diffusers.rewards.digits")

    def digit_in(device="cpu", digits=()):
        calls.append((device, list(digits)))
        return lambda images, prompts: torch.full((images.shape[0],), float(len(digits)))

    fake.digit_in = digit_in
    monkeypatch.setitem(sys.modules, "orw_diffusers.rewards.digits", fake)
    reward = build_reward([{"name": "digit_in", "kwargs": {"digits": [1, 3]}}], dtype="float16", batch_size=4)
    assert calls == [(torch.device("cpu"), [1, 3])]
    assert reward(_images(2), ["", ""]).rewards.tolist() == [2.0, 2.0]


def test_bad_placement_arguments():
    with pytest.raises(ValueError, match="dtype"):
        build_reward("jpeg_compressibility", dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        build_reward("jpeg_compressibility", batch_size=0)


# --- JPEG ----------------------------------------------------------------------------------------


def test_jpeg_flat_grey_is_more_compressible_than_noise():
    images = torch.stack(
        [torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    )
    compress = build_reward("jpeg_compressibility")(images, ["", ""])
    incompress = build_reward("jpeg_incompressibility")(images, ["", ""])
    assert compress.rewards.dtype == torch.float32 and compress.rewards.shape == (2,)
    assert compress.rewards[0] > compress.rewards[1]
    assert incompress.rewards[0] < incompress.rewards[1]
    torch.testing.assert_close(compress.rewards, -incompress.rewards)
    # DDPO's definition: the size in kB of the uint8 image saved by PIL as a quality-95 JPEG
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    assert incompress.rewards.tolist() == pytest.approx(sizes)


def test_jpeg_rejects_unknown_kwargs():
    with pytest.raises(TypeError):
        build_reward([{"name": "jpeg_compressibility", "kwargs": {"qualty": 90}}])


# --- composition, custom rewards, non-finite scores ------------------------------------------------


def test_composition_is_the_weighted_sum_of_its_parts(user_rewards):
    reward = build_reward(
        [
            {"name": "jpeg_compressibility", "weight": 0.1},
            {"name": f"{user_rewards}:brightness", "weight": 2.0, "kwargs": {"gain": 3.0}},
            {"name": f"{user_rewards}:prompt_length", "weight": -0.5},
        ]
    )
    assert reward.names == ["jpeg_compressibility", "brightness", "prompt_length"]
    images, prompts = _images(3, 32), ["a", "bb", "cccc"]
    out = reward(images, prompts)
    assert out.num_nonfinite == 0 and set(out.components) == set(reward.names)
    torch.testing.assert_close(out.components["brightness"], 3.0 * images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out.components["prompt_length"], torch.tensor([1.0, 2.0, 4.0]))
    expected = (
        0.1 * out.components["jpeg_compressibility"]
        + 2.0 * out.components["brightness"]
        - 0.5 * torch.tensor([1.0, 2.0, 4.0])
    )
    torch.testing.assert_close(out.rewards, expected)
    assert out.rewards.dtype == torch.float32 and out.rewards.device.type == "cpu"


def test_repeated_names_get_distinct_labels(user_rewards):
    reward = build_reward([f"{user_rewards}:brightness", {"name": f"{user_rewards}:brightness", "kwargs": {"gain": 2}}])
    assert reward.names == ["brightness_0", "brightness_1"]
    out = reward(_images(2), ["", ""])
    torch.testing.assert_close(out.components["brightness_1"], 2 * out.components["brightness_0"])


def test_custom_module_function(tmp_path, monkeypatch):
    (tmp_path / "orw_test_user_module.py").write_text(
        "def score(images, prompts):\n    return images.amax(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _images(3)
    out = build_reward("orw_test_user_module:score")(images, ["", "", ""])
    torch.testing.assert_close(out.rewards, images.amax(dim=(1, 2, 3)))
    with pytest.raises(ConfigError, match="no callable"):
        parse_reward_spec("orw_test_user_module:nope")


def test_non_finite_scores_are_replaced_by_the_batch_minimum_and_counted(user_rewards, caplog):
    images = _images(5)
    means = images.mean(dim=(1, 2, 3))
    reward = build_reward({f"{user_rewards}:nan_first_two": 1.0, f"{user_rewards}:with_inf": 0.5})
    with caplog.at_level(logging.WARNING):
        out = reward(images, [""] * 5)
    assert out.num_nonfinite == 3
    assert torch.isfinite(out.rewards).all()
    expected_nan = torch.cat([means[2:].min().repeat(2), means[2:]])
    expected_inf = torch.cat([means[:4], means[:4].min().reshape(1)])
    torch.testing.assert_close(out.components["nan_first_two"], expected_nan)
    torch.testing.assert_close(out.components["with_inf"], expected_inf)
    torch.testing.assert_close(out.rewards, expected_nan + 0.5 * expected_inf)
    assert "'nan_first_two'" in caplog.text and "2 non-finite" in caplog.text


def test_a_batch_without_finite_scores_raises(user_rewards):
    reward = build_reward(f"{user_rewards}:all_nan")
    with pytest.raises(RewardError, match="'all_nan'.*no finite score"):
        reward(_images(3), [""] * 3)
    with pytest.raises(RewardError, match="'wrong_length' returned 4 scores for 3 images"):
        build_reward(f"{user_rewards}:wrong_length")(_images(3), [""] * 3)


def test_clean_scores_leaves_finite_scores_alone():
    scores = torch.tensor([1.0, -2.0, 3.0])
    cleaned, bad = clean_scores(scores, "x")
    assert bad == 0 and torch.equal(cleaned, scores)
    cleaned, bad = clean_scores(torch.tensor([1.0, math.nan, -2.0]), "x")
    assert bad == 1 and cleaned.tolist() == [1.0, -2.0, -2.0]


def test_input_checks(user_rewards):
    reward = build_reward(f"{user_rewards}:brightness")
    with pytest.raises(ValueError, match="prompts"):
        reward(_images(3), ["a"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 16, 16), ["a"] * 3)
    assert isinstance(reward, CompositeReward)

"""Digits base and digit rewards, on a miniature build (plumbing only; quality is checked by `digits evaluate`)."""

import os

import pytest
import torch

torch.set_num_threads(1)

from orw_diffusers import digits  # noqa: E402
from orw_diffusers.rewards.digits import digit_even, digit_in  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("orw_cache"))


@pytest.fixture(scope="module")
def base(cache) -> str:
    """The mini base, published where ensure_digits_base looks for it."""
    path = os.path.join(cache, digits.BASE_NAME)
    return digits.build_digits_base(path, seed=0, mini=True, progress=False)


@pytest.fixture(scope="module")
def pipe(base):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)


def test_data_split_is_disjoint_and_in_range():
    train, train_labels = digits.load_digit_images("train")
    heldout, heldout_labels = digits.load_digit_images("heldout")
    assert train.shape == (1437, 3, 16, 16) and heldout.shape == (360, 3, 16, 16)
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    assert torch.bincount(heldout_labels, minlength=10).min() >= 35  # stratified
    # no held-out image is also a training image
    flat_train = {tuple(x.flatten().tolist()) for x in train[:, 0, ::2, ::2]}
    assert sum(tuple(x.flatten().tolist()) in flat_train for x in heldout[:, 0, ::2, ::2]) < 5


def test_base_layout_and_vae_scaling(base, pipe):
    for name in ("model_index.json", "digits_build.json", "transformer", "vae", "classifiers"):
        assert os.path.exists(os.path.join(base, name)), name
    assert not [d for d in os.listdir(os.path.dirname(base)) if ".tmp-" in d]  # the temp dir was renamed
    assert pipe.text_encoder_3 is None
    assert pipe.vae.config.scaling_factor != 1.5035  # replaced by the trained latents' statistics
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == digits.DIGITS_RESOLUTION


def test_pipeline_generates_images(pipe):
    generator = torch.Generator().manual_seed(0)
    out = pipe([digits.GENERIC_PROMPT, digits.specific_prompt(3)], num_inference_steps=2,
               guidance_scale=digits.DIGITS_GUIDANCE_SCALE, max_sequence_length=digits.DIGITS_MAX_SEQUENCE_LENGTH,
               output_type="pt", generator=generator).images
    assert out.shape == (2, 3, digits.DIGITS_RESOLUTION, digits.DIGITS_RESOLUTION)
    assert torch.isfinite(out).all() and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    again = digits.generate_digits(pipe, [digits.GENERIC_PROMPT] * 2, seed=1, num_inference_steps=2)
    assert torch.equal(again, digits.generate_digits(pipe, [digits.GENERIC_PROMPT] * 2, seed=1, num_inference_steps=2))


def test_rewards_shape_range_determinism(base):
    images, labels = digits.load_digit_images("heldout")
    images, labels = images[:16], labels[:16]
    even = digit_even(base_path=base)
    r = even(images, [""] * 16)
    assert r.shape == (16,) and r.dtype == torch.float32
    assert (r >= 0).all() and (r <= 1).all()
    assert torch.equal(r, even(images, [""] * 16))
    # complementary sets sum to one, a one-digit set is a single softmax entry
    odd = digit_in(base_path=base, digits=[1, 3, 5, 7, 9])(images, [""] * 16)
    torch.testing.assert_close(r + odd, torch.ones(16))
    three = digit_in(base_path=base, digits=[3])(images, [""] * 16)
    assert (three <= odd + 1e-6).all()


def test_rewards_reject_bad_input(base):
    for bad in ([], [10], [-1], ["3"], [True], 3.5):
        with pytest.raises(ValueError, match="digit_in"):
            digit_in(base_path=base, digits=bad)
    with pytest.raises(ValueError, match="16, 16"):
        digit_even(base_path=base)(torch.rand(2, 3, 32, 32), ["", ""])


def test_evaluate_images_on_real_digits():
    images, labels = digits.load_digit_images("heldout")
    report = digits.evaluate_images(images)
    assert report["num_samples"] == 360
    assert sum(report["histogram"]) == pytest.approx(1.0)
    assert report["histogram"][0] == pytest.approx(float((labels == 0).float().mean()), abs=0.02)
    assert report["p_even"] == pytest.approx(float((labels % 2 == 0).float().mean()), abs=0.02)
    assert report["even_entropy"] == pytest.approx(torch.log(torch.tensor(5.0)).item(), abs=0.01)
    assert report["confident_share"] == report["real_confident_share"] > 0.5
    only_zeros = digits.evaluate_images(images[labels == 0])
    assert only_zeros["p_even"] > 0.95 and only_zeros["even_entropy"] < 0.2


def test_ensure_reuses_cache_and_ignores_temp_dirs(base, cache, monkeypatch):
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", cache)
    built = []
    monkeypatch.setattr(digits.base, "build_digits_base", lambda *a, **k: built.append(a))
    assert digits.ensure_digits_base(progress=False) == base
    assert digits.ensure_digits_base(progress=False) == base
    assert built == []


def test_ensure_builds_when_only_an_interrupted_build_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path))
    stale = tmp_path / (digits.BASE_NAME + ".tmp-interrupted")
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")
    calls = []

    def fake_build(out_dir, seed=0, mini=False, progress=True):
        calls.append(out_dir)
        os.makedirs(os.path.join(out_dir, digits.CLASSIFIER_DIR))
        for name in ("model_index.json", "digits_build.json"):
            open(os.path.join(out_dir, name), "w").close()
        return out_dir

    monkeypatch.setattr(digits.base, "build_digits_base", fake_build)
    path = digits.ensure_digits_base(progress=False)
    assert calls == [str(tmp_path / digits.BASE_NAME)] and path == calls[0]
    assert digits.ensure_digits_base(progress=False) == path and len(calls) == 1


def test_processes_starting_together_build_the_base_once(tmp_path, monkeypatch):
    """Two builders on an empty cache: one builds under the lock, the other waits and reuses its build."""
    import threading

    monkeypatch.setenv("ORW_DIFFUSERS_CACHE", str(tmp_path))
    real_build, calls, start = digits.base.build_digits_base, [], threading.Barrier(2)

    def mini_build(out_dir, seed=0, progress=True):
        calls.append(out_dir)
        return real_build(out_dir, seed=seed, mini=True, progress=False)

    monkeypatch.setattr(digits.base, "build_digits_base", mini_build)
    paths = []

    def builder():
        start.wait()
        paths.append(digits.ensure_digits_base(progress=False))

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    base = str(tmp_path / digits.BASE_NAME)
    assert calls == [base] and paths == [base, base]
    assert sorted(os.listdir(tmp_path)) == [digits.BASE_NAME, digits.BASE_NAME + ".lock"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(digits.base, "_train_vae", interrupted)
    with pytest.raises(KeyboardInterrupt):
        digits.build_digits_base(str(tmp_path / digits.BASE_NAME), mini=True, progress=False)
    assert os.listdir(tmp_path) == []


def test_the_digits_package_never_imports_the_rewards():
    """Imports go one way: rewards/digits.py uses orw_diffusers.digits, whose modules never import
    orw_diffusers.rewards (not even inside a function), so nothing the reward imports imports it back."""
    import ast

    folder = os.path.dirname(digits.__file__)
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [alias.name for alias in node.names]
                assert not any("rewards" in n.split(".") for n in names), f"{name}:{node.lineno} imports the rewards"


def test_the_robust_reward_cnn_gives_what_is_no_digit_about_uniform_probabilities():
    """Outlier exposure: off-manifold images (noise, saturated blocks, shuffled and over-contrasted digits) are trained
    towards uniform; the plain CNN, trained on the same digits, is confident on them (the pixel base's reward hack)."""
    from orw_diffusers.digits.classifier import off_manifold, train_reward_classifier

    torch.manual_seed(0)
    images, labels = digits.load_digit_images("train")
    plain = train_reward_classifier(images, labels, epochs=8, seed=0)
    robust = train_reward_classifier(images, labels, epochs=8, seed=0, robust=True)
    held, held_labels = digits.load_digit_images("heldout")
    outliers = off_manifold(held[:200], torch.Generator().manual_seed(1))
    assert outliers.shape == held[:200].shape and 0 <= outliers.min() and outliers.max() <= 1
    confidence = {name: m(outliers).softmax(-1).max(-1).values.mean().item() for name, m in (("plain", plain),
                                                                                             ("robust", robust))}
    assert confidence["robust"] < 0.3 < confidence["plain"], confidence  # uniform is 0.1
    accuracy = (robust(held).argmax(-1) == held_labels).float().mean().item()
    assert accuracy > 0.5  # it still reads digits after 8 epochs (chance: 0.1)

"""Model-based rewards on tiny random models built here, saved to disk and loaded back through the
same local-checkpoint paths that users' downloaded weights take (nothing touches the network)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from orw_diffusers.rewards import build_reward, clear_model_cache
from orw_diffusers.rewards.common import preprocess_images

torch.set_num_threads(1)

CLIP_NAME = "orw-rewards-test-tiny-clip"  # registered with open_clip.add_model_config below
EMBED_DIM = 16
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue")


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def _tiny_open_clip(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(CLIP_NAME).eval()


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """A tiny open_clip architecture and two checkpoints of it: safetensors and a {'state_dict'} pickle."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-open-clip")
    config = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{CLIP_NAME}.json")  # the default tokenizer's BPE ships with open_clip
    model, other = _tiny_open_clip(0), _tiny_open_clip(1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "clip.safetensors")
    torch.save({"state_dict": other.state_dict(), "epoch": 3}, root / "hps.pt")  # HPSv2's checkpoint layout
    return SimpleNamespace(
        weights=str(root / "clip.safetensors"), hps_weights=str(root / "hps.pt"), model=model, hps_model=other
    )


@pytest.fixture(scope="module")
def aesthetic_weights(tmp_path_factory):
    """A tiny MLP in the improved-aesthetic-predictor layout (layers.0/2/4/6/7) as safetensors."""
    from safetensors.torch import save_file

    from orw_diffusers.rewards.aesthetic import aesthetic_mlp

    torch.manual_seed(2)
    sizes = [EMBED_DIM, 32, 16, 8, 4, 1]
    state = {}
    for key, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:])):
        state[f"layers.{key}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        state[f"layers.{key}.bias"] = torch.randn(n_out)
    path = tmp_path_factory.mktemp("aesthetic") / "mlp.safetensors"
    save_file(state, path)
    return SimpleNamespace(path=str(path), mlp=aesthetic_mlp(state).eval())


@pytest.fixture(scope="module")
def hf_clip_dirs(tmp_path_factory):
    """A tiny transformers CLIPModel and a CLIPProcessor, each saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from orw_diffusers.tiny import clip_tokenizer

    root = tmp_path_factory.mktemp("tiny-hf-clip")
    tokenizer = clip_tokenizer(WORDS, model_max_length=16)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            **ids,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        projection_dim=EMBED_DIM,
    )
    torch.manual_seed(3)
    model = CLIPModel(config).eval()
    model.save_pretrained(root / "model")
    # shortest edge 36 then a 32 crop, so the resize and the crop are both exercised
    image_processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(root / "processor")
    return SimpleNamespace(
        model_dir=str(root / "model"), processor_dir=str(root / "processor"), model=model, processor=processor
    )


@pytest.fixture
def spec_for(open_clip_files, aesthetic_weights, hf_clip_dirs):
    """name -> a reward spec on the tiny models."""
    kwargs = {
        "clip_score": {"model": CLIP_NAME, "pretrained": open_clip_files.weights},
        "clip_zero_shot": {
            "model": CLIP_NAME,
            "pretrained": open_clip_files.weights,
            "positive": ["a photo of a dog"],
            "negative": ["a photo of a cat", "a red photo"],
        },
        "hpsv2": {"model": CLIP_NAME, "weights": open_clip_files.hps_weights},
        "aesthetic": {
            "clip_model": CLIP_NAME,
            "clip_pretrained": open_clip_files.weights,
            "weights": aesthetic_weights.path,
        },
        "pickscore": {"model": hf_clip_dirs.model_dir, "processor": hf_clip_dirs.processor_dir},
    }
    return lambda name: {"name": name, "kwargs": dict(kwargs[name])}


MODEL_REWARDS = ["clip_score", "clip_zero_shot", "hpsv2", "aesthetic", "pickscore"]
PROMPTS = ["a photo of a dog", "a red cat", "a photo of a cat", "blue dog", "a dog", "a photo of a dog", "cat"]


def _images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_reward_shape_determinism_and_batch_invariance(name, spec_for):
    spec = spec_for(name)
    images = _images(len(PROMPTS))
    out = build_reward([spec], batch_size=64)(images, PROMPTS)
    scores = out.components[name]
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all() and out.num_nonfinite == 0
    assert scores.std() > 0  # depends on the images (and prompts)
    # deterministic, also after a fresh load from disk
    again = build_reward([spec], batch_size=64)(images, PROMPTS).components[name]
    assert torch.equal(scores, again)
    clear_model_cache()
    reloaded = build_reward([spec], batch_size=64)(images, PROMPTS).components[name]
    torch.testing.assert_close(scores, reloaded, rtol=0, atol=1e-6)
    # chunks of 2 (4 forward passes) give the unchunked scores
    chunked = build_reward([spec], batch_size=2)(images, PROMPTS).components[name]
    torch.testing.assert_close(scores, chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_reward_models_are_frozen_and_in_eval_mode(name, spec_for):
    reward = build_reward([spec_for(name)])
    model = reward.fns[0].bundle.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_clip_score_is_scaled_cosine_with_the_saved_weights(open_clip_files):
    import open_clip

    images = _images(4, 32, 32)
    prompts = PROMPTS[:4]
    spec = {"name": "clip_score", "kwargs": {"model": CLIP_NAME, "pretrained": open_clip_files.weights, "scale": 2.5}}
    scores = build_reward([spec])(images, prompts).rewards
    # reference: the in-memory model that was saved, with open_clip's own tokenizer; 32 px needs no resize
    model, tokenizer = open_clip_files.model, open_clip.get_tokenizer(CLIP_NAME)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        image_emb = model.encode_image((images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), normalize=True)
        text_emb = model.encode_text(tokenizer(prompts), normalize=True)
    torch.testing.assert_close(scores, 2.5 * (image_emb * text_emb).sum(-1), rtol=1e-5, atol=1e-5)


def test_composite_exposes_the_clip_image_embedding_for_diversity(open_clip_files):
    images = _images(3, 32, 32)
    clip = {"name": "clip_score", "kwargs": {"model": CLIP_NAME, "pretrained": open_clip_files.weights}}
    reward = build_reward([{"name": "jpeg_compressibility"}, clip])
    emb = reward.embed(images)
    assert emb.shape[0] == 3 and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-4, rtol=1e-4)
    assert not hasattr(build_reward("jpeg_compressibility"), "embed")  # no model: the trainer falls back to latents


def test_clip_score_preprocessing_matches_open_clip_transform(open_clip_files):
    """Torch resize/crop/normalise vs open_clip's PIL pipeline, on a smooth non-square image."""
    import open_clip
    from PIL import Image

    ramp_y, ramp_x = torch.linspace(0.2, 0.8, 60), torch.linspace(0.1, 0.9, 90)
    image = torch.stack([ramp_y[:, None] * ramp_x[None, :], ramp_y[:, None].expand(60, 90), ramp_x.expand(60, 90)])
    pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    reference = preprocess(pil)
    ours = preprocess_images(
        (image * 255).round().unsqueeze(0) / 255, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    )[0]
    assert ours.shape == reference.shape == (3, 32, 32)
    assert (ours - reference).abs().max() < 0.05  # PIL resamples in uint8; torch in float


def test_text_embeddings_are_cached_per_unique_prompt(open_clip_files, monkeypatch):
    reward = build_reward(
        [{"name": "clip_score", "kwargs": {"model": CLIP_NAME, "pretrained": open_clip_files.weights}}]
    )
    model = reward.fns[0].bundle.model
    encoded = []
    original = model.encode_text
    monkeypatch.setattr(
        model, "encode_text", lambda tokens, **kw: encoded.append(len(tokens)) or original(tokens, **kw)
    )
    reward(_images(len(PROMPTS)), PROMPTS)
    reward(_images(3, seed=1), PROMPTS[:3])
    assert sum(encoded) == len(set(PROMPTS))


def test_clip_zero_shot_is_positive_minus_negative_probability(open_clip_files, spec_for):
    import open_clip

    spec = spec_for("clip_zero_shot")
    images = _images(5, 32, 32)
    out = build_reward([spec])(images, ["x"] * 5)
    scores = out.rewards
    assert ((scores >= -1) & (scores <= 1)).all()
    # prompt-independent
    torch.testing.assert_close(scores, build_reward([spec])(images, ["a dog"] * 5).rewards)
    model, tokenizer = open_clip_files.model, open_clip.get_tokenizer(CLIP_NAME)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        image_emb = model.encode_image((images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), normalize=True)
        text_emb = model.encode_text(tokenizer(["a photo of a dog", "a photo of a cat", "a red photo"]), normalize=True)
        probs = (model.logit_scale.exp() * image_emb @ text_emb.T).softmax(-1)
    torch.testing.assert_close(scores, probs[:, 0] - probs[:, 1] - probs[:, 2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        build_reward([{"name": "clip_zero_shot", "kwargs": {**spec["kwargs"], "negative": []}}])


def test_hpsv2_loads_the_state_dict_checkpoint_and_letterboxes(open_clip_files, spec_for):
    import open_clip

    spec = spec_for("hpsv2")
    images = _images(2, 16, 32)  # wide: resized to 16 x 32, padded to 32 x 32 with black
    scores = build_reward([spec])(images, PROMPTS[:2]).rewards
    model, tokenizer = open_clip_files.hps_model, open_clip.get_tokenizer(CLIP_NAME)
    padded = torch.nn.functional.pad(images, (0, 0, 8, 8))
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        image_emb = model.encode_image((padded - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), normalize=True)
        text_emb = model.encode_text(tokenizer(PROMPTS[:2]), normalize=True)
    torch.testing.assert_close(scores, (image_emb * text_emb).sum(-1), rtol=1e-5, atol=1e-5)


def test_aesthetic_is_the_mlp_on_normalised_clip_embeddings(open_clip_files, aesthetic_weights, spec_for):
    import open_clip

    spec = spec_for("aesthetic")
    images = _images(3, 32, 32)
    scores = build_reward([spec])(images, ["", "", ""]).rewards
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        emb = open_clip_files.model.encode_image(
            (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), normalize=True
        )
        expected = aesthetic_weights.mlp(emb).squeeze(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_mlp_layout_and_dimension_check(open_clip_files, tmp_path):
    from safetensors.torch import save_file

    from orw_diffusers.rewards.aesthetic import aesthetic_mlp

    real = [768, 1024, 128, 64, 16, 1]  # the published predictor
    state = {}
    for key, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(real, real[1:])):
        state[f"layers.{key}.weight"], state[f"layers.{key}.bias"] = torch.zeros(n_out, n_in), torch.zeros(n_out)
    mlp = aesthetic_mlp(state)
    assert [m.in_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == real[:-1]
    save_file(state, tmp_path / "big.safetensors")
    kwargs = {
        "clip_model": CLIP_NAME,
        "clip_pretrained": open_clip_files.weights,
        "weights": str(tmp_path / "big.safetensors"),
    }
    with pytest.raises(ValueError, match="768-d"):
        build_reward([{"name": "aesthetic", "kwargs": kwargs}])
    with pytest.raises(ValueError, match="layers"):
        aesthetic_mlp({"fc.weight": torch.zeros(1, 1)})
    with pytest.raises(FileNotFoundError):
        build_reward([{"name": "aesthetic", "kwargs": {**kwargs, "weights": str(tmp_path / "none.pt")}}])


def test_pickscore_matches_the_readme_recipe(hf_clip_dirs):
    images = 0.25 + 0.5 * _images(3, 40, 56)  # no bicubic overshoot, so the processor needs no clamping
    prompts = ["a photo of a cat", "a red dog", "blue"]
    spec = {"name": "pickscore", "kwargs": {"model": hf_clip_dirs.model_dir, "processor": hf_clip_dirs.processor_dir}}
    scores = build_reward([spec])(images, prompts).rewards
    model, processor = hf_clip_dirs.model, hf_clip_dirs.processor
    pixels = processor.image_processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=pixels)
        text_emb = model.get_text_features(**text)
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (image_emb * text_emb).sum(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_identical_models_are_loaded_once(spec_for, monkeypatch):
    import open_clip
    import transformers

    loads = []
    create_model = open_clip.create_model
    monkeypatch.setattr(
        open_clip, "create_model", lambda *a, **kw: loads.append((a, kw["precision"])) or create_model(*a, **kw)
    )
    hf_loads = []
    from_pretrained = transformers.CLIPModel.from_pretrained
    monkeypatch.setattr(
        transformers.CLIPModel, "from_pretrained", lambda *a, **kw: hf_loads.append(a) or from_pretrained(*a, **kw)
    )
    specs = [spec_for(n) for n in ("clip_score", "clip_zero_shot", "aesthetic", "pickscore")]
    reward = build_reward(specs + [{"name": "pickscore", "weight": 0.5, "kwargs": specs[3]["kwargs"]}])
    assert len(loads) == 1 and len(hf_loads) == 1
    assert reward.fns[0].bundle is reward.fns[1].bundle is reward.fns[2].bundle
    out = reward(_images(3), PROMPTS[:3])
    assert set(out.components) == {"clip_score", "clip_zero_shot", "aesthetic", "pickscore_3", "pickscore_4"}
    # same model, another dtype or other weights: a second load
    build_reward([{"name": "clip_score", "kwargs": specs[0]["kwargs"]}], dtype="bfloat16")
    build_reward([spec_for("hpsv2")])
    assert len(loads) == 3 and loads[1][1] == "bf16"


def test_reduced_precision_reward_stays_close_and_float32(open_clip_files):
    spec = {"name": "clip_score", "kwargs": {"model": CLIP_NAME, "pretrained": open_clip_files.weights}}
    images = _images(4)
    full = build_reward([spec])(images, PROMPTS[:4]).rewards
    half = build_reward([spec], dtype="bfloat16")(images, PROMPTS[:4]).rewards
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=0, atol=1.5)  # scores spread over ~15 here; bf16 keeps ~3 digits


def test_preprocess_longest_pads_and_squash_resizes():
    images = torch.ones(1, 3, 8, 16)
    out = preprocess_images(images, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_mode="longest", fill=0.25)
    assert out.shape == (1, 3, 16, 16)
    assert torch.all(out[..., :4, :] == 0.25) and torch.all(out[..., 12:, :] == 0.25)
    assert torch.allclose(out[..., 4:12, :], torch.ones(1))
    squashed = preprocess_images(images, (4, 4), (0.5,) * 3, (0.5,) * 3, resize_mode="squash")
    assert squashed.shape == (1, 3, 4, 4) and torch.allclose(squashed, torch.ones(1))
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess_images(images, 4, (0,) * 3, (1,) * 3, resize_mode="fit")

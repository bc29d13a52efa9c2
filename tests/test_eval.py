"""The evaluation: ``latentdiff eval`` on a tiny random pipeline, the scoring path on ground-truth and blank
images, the Frechet distance, the shapes encoder and SFD, FID and CLIP score, and the quality-vs-steps bench."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from latentdiff.data.shapes import make_shapes_dataset, render_scene
from latentdiff.eval.adherence import (
    _FAIL_COLOR,
    _PASS_COLOR,
    evaluate_adherence,
    format_table,
    image_seed,
    select_prompts,
)
from latentdiff.eval.judge import degrade
from latentdiff.eval.metrics import (
    INCEPTION_WEIGHTS_URL,
    clip_score,
    feature_statistics,
    fid,
    frechet_distance,
    shapes_frechet_distance,
)
from latentdiff.eval.suite import SEEN_TASKS, TASKS, example_scene, shapes_suite

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny random pipeline saved as ``run/pipeline``, with sampling defaults (guidance 3) and the run's
    ``config.yaml`` (holdout: green circles) in ``run/``, as a training run leaves them."""
    from latentdiff.pipelines import LatentPipeline
    from latentdiff.testing import tiny_components

    run = tmp_path_factory.mktemp("run")
    pipeline = LatentPipeline(**tiny_components(seed=0))
    pipeline.sampling_defaults = {"guidance_scale": 3.0}
    pipeline.save_pretrained(run / "pipeline")
    config = {"output_dir": str(run), "data": {"source": "shapes", "shapes": {"holdout": ["green circle"]}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return str(run / "pipeline")


class RenderingPipeline:
    """Stands in for a pipeline: returns a ground-truth render of each prompt's example scene (or a blank
    image), and records the batch sizes it was called with."""

    def __init__(self, suite, blank: bool = False, image_size: int = 64):
        from latentdiff.testing import tiny_components

        self.spec_of = {spec.prompt: spec for spec in suite}
        self.blank = blank
        self.image_size = image_size
        self.scheduler = tiny_components()["scheduler"]
        self.batches: list[int] = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, **kwargs):
        assert len(generator) == len(prompts)
        self.batches.append(len(prompts))
        if self.blank:
            images = [Image.new("RGB", (self.image_size, self.image_size), "white") for _ in prompts]
        else:
            images = [render_scene(example_scene(self.spec_of[prompt]), self.image_size) for prompt in prompts]
        return SimpleNamespace(images=images)


# --------------------------------------------------------------------------------------------
# latentdiff eval
# --------------------------------------------------------------------------------------------


def test_eval_command_end_to_end(pipeline_folder, tmp_path, capsys):
    from latentdiff.cli import main

    out = tmp_path / "eval"
    argv = ["eval", pipeline_folder, "--max-prompts-per-task", "1", "--steps", "2", "--images-per-prompt", "2",
            "--batch-size", "7", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "shapes-v1"
    assert results["model"] == os.path.abspath(pipeline_folder)
    # holdout from the run's config.yaml, guidance from the model's sampling defaults
    assert results["holdout"] == ["green circle"] and "config.yaml" in results["holdout_source"]
    assert results["sampler"]["guidance_scale"] == 3.0
    assert results["sampler"]["guidance_source"] == "the model's sampling defaults"
    assert {key: results["sampler"][key] for key in ("scheduler", "steps", "seed", "images_per_prompt")} == {
        "scheduler": "dpm", "steps": 2, "seed": 0, "images_per_prompt": 2}
    assert (results["sampler"]["height"], results["sampler"]["width"]) == (32, 32)
    assert results["num_prompts"] == len(TASKS) and results["num_images"] == 2 * len(TASKS)

    records = results["images"]
    assert len(records) == 2 * len(TASKS)
    for record in records:
        assert set(record) == {"index", "prompt", "task", "image_index", "seed", "passed", "reason", "right_count", "judged"}
        assert record["seed"] == image_seed(0, record["prompt"], record["image_index"])
        assert record["passed"] == (record["reason"] is None)
        assert set(record["judged"]) == {"background", "objects", "specks"}
    unseen_prompts = [record["prompt"] for record in records if record["task"] == "unseen"]
    assert unseen_prompts and all("green circle" in prompt for prompt in unseen_prompts)
    # the figures are those of the records
    for task in TASKS:
        passed = [record["passed"] for record in records if record["task"] == task]
        assert results["tasks"][task]["accuracy"] == pytest.approx(sum(passed) / len(passed))
    seen = [results["tasks"][task]["accuracy"] for task in SEEN_TASKS]
    assert results["overall"] == pytest.approx(sum(seen) / len(seen))
    for task in TASKS:  # the right object count: its own column, from the records
        right = [record["right_count"] for record in records if record["task"] == task]
        assert results["tasks"][task]["right_count"] == pytest.approx(sum(right) / len(right))
    right_by_task = [results["tasks"][task]["right_count"] for task in SEEN_TASKS]
    assert results["right_count"] == pytest.approx(sum(right_by_task) / len(right_by_task))
    assert results["unseen"] == results["tasks"]["unseen"]["accuracy"]
    assert results["sampler"]["guidance_interval"] is None  # the model saved none: guidance at every step

    # the table: one line per task, then overall and unseen
    lines = printed.splitlines()
    for task in TASKS:
        line = next(line for line in lines if line.startswith(task + " "))
        assert line.split()[1:3] == ["2", f"{results['tasks'][task]['accuracy']:.3f}"]
    assert any(line.startswith("overall") and f"{results['overall']:.3f}" in line for line in lines)

    # the grid: a frame per image, green for passed and red for failed ones
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape[0] > 3 * 96 and grid.shape[1] > 3 * 2 * 96
    has = {color: bool((grid == np.array(color, dtype=np.uint8)).all(-1).any()) for color in (_PASS_COLOR, _FAIL_COLOR)}
    assert has[_PASS_COLOR] == any(record["passed"] for record in records)
    assert has[_FAIL_COLOR] == (not all(record["passed"] for record in records))


def test_eval_guidance_interval_is_passed_to_the_pipeline_and_recorded(pipeline_folder, tmp_path, capsys):
    from latentdiff.cli import main

    argv = ["eval", pipeline_folder, "--tasks", "color", "--max-prompts-per-task", "1", "--steps", "2",
            "--images-per-prompt", "1", "--guidance-interval", "0", "600"]
    assert main(argv + ["--out", str(tmp_path / "interval")]) == 0
    assert "at timesteps 0-600" in capsys.readouterr().out
    results = json.loads((tmp_path / "interval" / "results.json").read_text())
    assert results["sampler"]["guidance_interval"] == [0.0, 600.0]
    assert main(argv[:-2] + ["600", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "`guidance_interval` has to be None or a pair (low, high)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eval_guidance_rescale_is_passed_to_the_pipeline_and_recorded(pipeline_folder, tmp_path, capsys):
    from latentdiff.cli import main

    argv = ["eval", pipeline_folder, "--tasks", "color", "--max-prompts-per-task", "1", "--steps", "2",
            "--images-per-prompt", "1", "--guidance", "5"]
    assert main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert "guidance rescale" not in capsys.readouterr().out
    assert main(argv + ["--guidance-rescale", "1", "--out", str(tmp_path / "rescaled")]) == 0
    assert "guidance rescale 1" in capsys.readouterr().out
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("plain", "rescaled")}
    assert (results["plain"]["sampler"]["guidance_rescale"], results["rescaled"]["sampler"]["guidance_rescale"]) == (0, 1)
    # the pipeline got it: the same seed and prompt give another image
    images = [np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("plain", "rescaled")]
    assert images[0].shape == images[1].shape and not np.array_equal(*images)
    assert main(argv + ["--guidance-rescale", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "`guidance_rescale` has to be a number in [0, 1] but is 1.5." in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eval_records_the_negative_prompt_it_used_the_given_or_the_model_saved_one(pipeline_folder, tmp_path, capsys):
    from latentdiff.cli import main

    argv = ["eval", pipeline_folder, "--tasks", "color", "--max-prompts-per-task", "1", "--steps", "2",
            "--images-per-prompt", "1"]
    assert main(argv + ["--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["sampler"]["negative_prompt"] is None
    assert main(argv + ["--negative-prompt", "a shape", "--out", str(tmp_path / "given")]) == 0
    assert "negative prompt 'a shape'" in capsys.readouterr().out
    given = json.loads((tmp_path / "given" / "results.json").read_text())
    assert given["sampler"]["negative_prompt"] == "a shape"
    # a model that saved one uses it; "" asks for the empty caption
    saved = tmp_path / "saved"
    shutil.copytree(pipeline_folder, saved)
    defaults_file = saved / "latentdiff.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    defaults_file.write_text(json.dumps({**defaults, "negative_prompt": "a shape"}))
    assert main(["eval", str(saved), *argv[2:], "--out", str(tmp_path / "from_model")]) == 0
    from_model = json.loads((tmp_path / "from_model" / "results.json").read_text())
    assert from_model["sampler"]["negative_prompt"] == "a shape"
    assert [r["passed"] for r in from_model["images"]] == [r["passed"] for r in given["images"]]
    assert main(["eval", str(saved), *argv[2:], "--negative-prompt", "", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "results.json").read_text())["sampler"]["negative_prompt"] is None


def test_eval_command_rejects_bad_input_before_loading(tmp_path, capsys):
    from latentdiff.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--tasks", "colour"]) == 2
    assert "unknown task(s) ['colour']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--images-per-prompt", "0"]) == 2
    assert "images-per-prompt must be a positive integer" in capsys.readouterr().err


def test_images_do_not_depend_on_batching_or_subset(pipeline_folder):
    from latentdiff.pipelines import LatentPipeline

    pipeline = LatentPipeline.from_pretrained(pipeline_folder)
    scheduler_before = pipeline.scheduler
    suite = select_prompts(shapes_suite(), tasks=["color", "counting"], max_prompts_per_task=2)
    settings = {"images_per_prompt": 2, "steps": 2, "scheduler": "ddpm", "progress": False}  # stochastic sampler
    together = evaluate_adherence(pipeline, suite, batch_size=8, **settings)
    alone = evaluate_adherence(pipeline, suite[-1:], batch_size=1, **settings)
    assert pipeline.scheduler is scheduler_before  # restored
    assert [r["seed"] for r in together.records[-2:]] == [r["seed"] for r in alone.records]
    for image, same in zip(together.images[-2:], alone.images):
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(same, dtype=int)).max() <= 1
    # different images of one prompt, and of different prompts, get different noise
    assert len({record["seed"] for record in together.records}) == len(together.records)


def test_scoring_passes_ground_truth_and_fails_blank_images():
    suite = shapes_suite()
    truth = RenderingPipeline(suite)
    results = evaluate_adherence(truth, suite, images_per_prompt=1, steps=1, batch_size=16, progress=False)
    failures = [(r["prompt"], r["reason"]) for r in results.records if not r["passed"]]
    assert not failures, failures[:5]
    assert results.overall == 1.0 and results.unseen == 1.0
    assert set(results.summary["tasks"]) == set(TASKS)
    assert max(truth.batches) == 16 and len(truth.batches) == -(-len(suite) // 16)  # many prompts per call

    blank = evaluate_adherence(RenderingPipeline(suite, blank=True), suite, images_per_prompt=1, steps=1,
                               progress=False)
    assert blank.overall < 0.05 and blank.unseen == 0.0
    assert all(r["reason"] for r in blank.records if not r["passed"])
    table = format_table(blank.summary)
    assert "overall" in table and "unseen" in table


def test_select_prompts():
    suite = shapes_suite()
    chosen = select_prompts(suite, tasks=["relation", "unseen"], max_prompts_per_task=3)
    assert [spec.task for spec in chosen] == ["relation"] * 3 + ["unseen"] * 3
    assert chosen == [spec for spec in suite if spec in chosen]  # suite order
    with pytest.raises(ValueError, match="unknown task"):
        select_prompts(suite, tasks=["colour"])
    with pytest.raises(ValueError, match="no prompts selected"):
        select_prompts(shapes_suite(holdout=()), tasks=["unseen"])


# --------------------------------------------------------------------------------------------
# The Frechet distance
# --------------------------------------------------------------------------------------------


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.1 * np.eye(dim)


def _symmetric_root(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_frechet_distance_reference_cases():
    rng = np.random.default_rng(0)
    mean, covariance = rng.normal(size=5), _random_covariance(rng, 5)
    assert frechet_distance(mean, covariance, mean, covariance) == pytest.approx(0.0, abs=1e-8)
    # 1-D: N(1, 2^2) and N(3, 3^2): (1 - 3)^2 + (2 - 3)^2 = 5
    one_d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert one_d == pytest.approx(5.0)
    # diagonal covariances: sum of squared mean differences plus (sqrt(a) - sqrt(b))^2 per dimension
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    expected = 3 * 0.5**2 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(a), np.full(3, 0.5), np.diag(b)) == pytest.approx(expected)
    # general case, against Tr((S1^1/2 S2 S1^1/2)^1/2) from symmetric eigendecompositions
    mean2, covariance2 = rng.normal(size=5), _random_covariance(rng, 5)
    root1 = _symmetric_root(covariance)
    trace_root = np.trace(_symmetric_root(root1 @ covariance2 @ root1))
    expected = ((mean - mean2) ** 2).sum() + np.trace(covariance) + np.trace(covariance2) - 2 * trace_root
    assert frechet_distance(mean, covariance, mean2, covariance2) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="means of shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------
# The shapes encoder and SFD
# --------------------------------------------------------------------------------------------


def test_shipped_encoder_reads_attributes():
    from latentdiff.eval.encoder import _make_split, attribute_accuracy, load_shapes_encoder

    encoder = load_shapes_encoder()
    assert encoder.metadata["command"].startswith("python -m latentdiff.eval.encoder")
    assert json.loads(encoder.metadata["heldout_accuracy"])["color_on_objects"] > 0.95
    pixels, targets = _make_split(200, seed=777)  # scenes the encoder was neither trained nor checked on
    accuracy = attribute_accuracy(encoder, pixels, targets)
    for name in ("color_on_objects", "shape_on_objects", "size_on_objects", "background"):
        assert accuracy[name] > 0.9, accuracy


def test_encoder_training_is_deterministic(tmp_path):
    from latentdiff.eval.encoder import EncoderTrainingConfig, load_shapes_encoder, main, train_shapes_encoder

    config = EncoderTrainingConfig(num_train=64, num_heldout=16, epochs=1, width=4, feature_dim=8)
    first, accuracy = train_shapes_encoder(config, progress=False)
    second, _ = train_shapes_encoder(config, progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert set(accuracy) >= {"color", "shape", "size", "background", "whole_scene"}

    path = str(tmp_path / "encoder.safetensors")
    assert main(["--out", path, "--num-train", "128", "--epochs", "1"]) == 0
    loaded = load_shapes_encoder(path)
    assert loaded.metadata["command"] == f"python -m latentdiff.eval.encoder --out {path} --num-train 128 --epochs 1"
    with pytest.raises(FileNotFoundError, match="python -m latentdiff.eval.encoder --out"):
        load_shapes_encoder(tmp_path / "missing.safetensors")


def test_shapes_frechet_distance_separates_real_from_degraded():
    real_a = list(make_shapes_dataset(200, seed=1)["image"])
    real_b = list(make_shapes_dataset(200, seed=2)["image"])
    blurred = [degrade(image, blur_radius=1.5) for image in real_b]
    blank = [Image.new("RGB", (64, 64), "white") for _ in range(200)]
    real_vs_real = shapes_frechet_distance(real_a, real_b)
    real_vs_blurred = shapes_frechet_distance(real_a, blurred)
    real_vs_blank = shapes_frechet_distance(real_a, blank)
    assert real_vs_real < real_vs_blurred < real_vs_blank
    assert real_vs_real < 0.1 * real_vs_blank
    # statistics can stand in for images; the default real side is the shipped reference renders
    from latentdiff.eval.encoder import encode_images

    statistics = feature_statistics(encode_images(real_a))
    assert shapes_frechet_distance(statistics, real_b) == pytest.approx(real_vs_real)
    assert shapes_frechet_distance(None, real_b) < 0.1 * shapes_frechet_distance(None, blank)
    # 32 px images are resized to the encoder's 64 px
    small = [image.resize((32, 32), Image.BILINEAR) for image in real_b[:50]]
    assert shapes_frechet_distance(real_a, small) < real_vs_blank


# --------------------------------------------------------------------------------------------
# FID and CLIP score
# --------------------------------------------------------------------------------------------


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    return list(make_shapes_dataset(count, seed=seed)["image"])


def test_fid_without_weights_or_packages_says_what_to_do(tmp_path, monkeypatch):
    images = _images(4)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05") as error:
        fid(images, images, tmp_path / "missing.pth")
    assert INCEPTION_WEIGHTS_URL in str(error.value)
    not_inception = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, not_inception)
    with pytest.raises(ValueError, match="does not hold the FID Inception-v3 weights"):
        fid(images, images, not_inception)
    looks_right = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, looks_right)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install \"torchmetrics\[image\]\" torch-fidelity"):
        fid(images, images, looks_right)


def test_fid_with_local_inception_weights(tmp_path, monkeypatch):
    """The real path through torchmetrics / torch-fidelity, with random Inception weights saved locally
    (the numbers mean nothing; only the standard weights give FIDs). Runs where the fid extra is installed."""
    pytest.importorskip("torchmetrics")
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:  # build the network without fetching or loading weights
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, **kwargs: None)
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    # batch-norm statistics from a few random images, so that random features are not all zero
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    network.train()
    with torch.no_grad():
        network(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), weights)
    real, other = _images(6, seed=1), [degrade(image, blur_radius=2) for image in _images(6, seed=2)]
    # 64-d features of the first pooling layer: the same code path as 2048, with a cheap matrix root
    assert fid(real, real, weights, feature_dim=64) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, other, weights, feature_dim=64) > 1e-3
    with pytest.raises(ValueError, match="feature_dim must be one of"):
        fid(real, other, weights, feature_dim=100)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny random open_clip model in open_clip's local folder layout (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**config)
    folder = tmp_path_factory.mktemp("open_clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    (folder / "latentdiff-tiny-clip.json").write_text(json.dumps(config))
    return folder


def test_clip_score_with_a_local_open_clip_model(tiny_open_clip):
    import open_clip

    images, prompts = _images(3), ["a red circle", "two blue squares", "a green triangle"]
    score = clip_score(images, prompts, None, tiny_open_clip)
    # the same figure by hand from the model: 100 * max(cos, 0), averaged
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip}")
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_features = model.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features)
    assert score == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)

    # a checkpoint file with the name of its architecture
    open_clip.add_model_config(tiny_open_clip / "latentdiff-tiny-clip.json")
    from_file = clip_score(images, prompts, "latentdiff-tiny-clip", tiny_open_clip / "open_clip_model.safetensors")
    assert from_file == pytest.approx(score, rel=1e-5, abs=1e-5)


def test_clip_score_errors(tiny_open_clip, tmp_path):
    images = _images(2)
    with pytest.raises(FileNotFoundError, match="no open_clip weights"):
        clip_score(images, ["a", "b"], "ViT-B-32", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, ["a red circle"], None, tiny_open_clip)
    with pytest.raises(ValueError, match="pass model_name"):
        clip_score(images, ["a", "b"], None, tiny_open_clip / "open_clip_model.safetensors")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        clip_score(images, ["a", "b"], None, tmp_path)
    import open_clip

    config = json.loads((tiny_open_clip / "latentdiff-tiny-clip.json").read_text())
    (tmp_path / "latentdiff-tiny-clip-8.json").write_text(json.dumps({**config, "embed_dim": 8}))
    open_clip.add_model_config(tmp_path / "latentdiff-tiny-clip-8.json")
    with pytest.raises(ValueError, match="does not hold weights of the open_clip architecture"):
        clip_score(images, ["a", "b"], "latentdiff-tiny-clip-8", tiny_open_clip / "open_clip_model.safetensors")


# --------------------------------------------------------------------------------------------
# bench/quality_vs_steps.py
# --------------------------------------------------------------------------------------------


def test_quality_vs_steps_quick(pipeline_folder, tmp_path, capsys):
    script = runpy.run_path(os.path.join(REPO_ROOT, "bench", "quality_vs_steps.py"))
    out = tmp_path / "bench"
    result = script["main"]([pipeline_folder, "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads((out / "quality_vs_steps.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = saved["rows"]
    assert [(row["scheduler"], row["steps"]) for row in rows[:-1]] == list(script["QUICK_CONFIGURATIONS"])
    for row in rows[:-1]:
        assert 0.0 <= row["overall"] <= 1.0 and row["sfd"] > 0 and row["wall_time_s"] > 0
    assert rows[-1]["sampler"] == "ground truth" and rows[-1]["overall"] == 1.0 and rows[-1]["unseen"] == 1.0
    assert rows[-1]["sfd"] < min(row["sfd"] for row in rows[:-1])  # random weights are far from the data
    assert saved["sfd"]["num_images"] == 16 and saved["holdout"] == ["green circle"]
    markdown = (out / "quality_vs_steps.md").read_text()
    assert "| sampler | steps | overall | unseen | SFD |" in markdown and "DPM-Solver++" in markdown
    assert "| DDPM | 6 |" in printed
    with pytest.raises(SystemExit):
        script["parse_args"]([pipeline_folder, "--samplers", "ddpm:1000,heun:10"])
    assert script["parse_args"]([pipeline_folder, "--samplers", "ddim:5,dpm:7"]).samplers == (("ddim", 5), ("dpm", 7))

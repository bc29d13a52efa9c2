"""Model card and Hub upload, checked without network: the prepared upload and the recorded calls."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from PIL import Image

from latentdiff import LatentPipeline
from latentdiff.hub import (
    PipelineHubMixin,
    UnsafeWeightsError,
    make_model_card,
    prepare_upload,
    read_sampling_defaults,
    write_model_card,
)

FAKE_TOKEN = "hf_FAKEtokenFORtests0123456789abcdef"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A training run's layout: <run>/config.yaml, <run>/training_summary.json, <run>/pipeline/ (+ samples.png)."""
    from latentdiff.config import config_to_dict, load_config
    from latentdiff.testing import tiny_components

    run = tmp_path_factory.mktemp("run")
    config = load_config(overrides={"model.preset": "tiny", "output_dir": str(run)})
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    (run / "training_summary.json").write_text(json.dumps({"optimizer steps": 123, "final loss": 0.0421}))
    pipe = LatentPipeline(**tiny_components(seed=0))
    pipe.save_pretrained(run / "pipeline", model_card=False)
    Image.new("RGB", (64, 32), "white").save(run / "pipeline" / "samples.png")
    return run


def front_matter_and_body(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, metadata, body = text.split("---\n", 2)
    return yaml.safe_load(metadata), body


def test_model_card_of_a_trained_pipeline(saved_run):
    card = make_model_card(saved_run / "pipeline", base_model="org/base-model", tags=["shapes"])
    assert isinstance(card, ModelCard)
    metadata, body = front_matter_and_body(str(card))
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "text-to-image"
    assert metadata["license"] == "apache-2.0"
    assert metadata["base_model"] == "org/base-model"
    assert {"latentdiff", "text-to-image", "diffusers", "shapes", "latent-diffusion"} <= set(metadata["tags"])

    assert "from latentdiff import LatentPipeline" in body
    assert 'LatentPipeline.from_pretrained("path/to/pipeline")' in body
    assert "| optimizer steps | 123 |" in body and "| final loss | 0.0421 |" in body  # training_summary.json
    assert "preset: tiny" in body  # config.yaml, from the run folder (the pipeline's parent)
    assert "| default guidance scale | 4.0 |" in body  # the run's sample.guidance_scale is the model's default
    assert '"a red circle"' in body  # the run's first sample prompt
    assert "![Samples](samples.png)" in body
    assert "UNet2DConditionModel (" in body and "M parameters)" in body


def test_model_card_without_run_files(tmp_path):
    from latentdiff.testing import tiny_components

    pipe = LatentPipeline(**tiny_components(seed=0))
    card = make_model_card(pipe, sample_grid=None, license="mit", training_summary="Trained for a test.")
    metadata, body = front_matter_and_body(str(card))
    assert metadata["license"] == "mit" and "base_model" not in metadata
    assert "Trained for a test." in body and "Samples" not in body
    assert '").images[0]  # the model\'s own steps and guidance' in body  # no arguments: the pipeline decides
    assert "default guidance scale" not in body


def test_write_model_card_for_the_trainer(saved_run, tmp_path):
    from latentdiff.trainer.checkpointing import TrainingState
    from latentdiff.config import load_config

    folder = tmp_path / "pipeline"
    LatentPipeline.from_pretrained(saved_run / "pipeline").save_pretrained(folder, model_card=False)
    config = load_config(overrides={"model.preset": "tiny", "sample.guidance_scale": 3.5,
                                    "sample.guidance_interval": [0, 600], "sample.negative_prompt": "a shape",
                                    "sample.negative_prompt_carry": " on an? \\w+ background$"})
    write_model_card(folder, config=config, training_state=TrainingState(global_step=7, images_seen=448))
    metadata, body = front_matter_and_body((folder / "README.md").read_text())
    assert metadata["pipeline_tag"] == "text-to-image"
    assert "| global step | 7 |" in body and "| images seen | 448 |" in body and "| model preset | tiny |" in body
    assert read_sampling_defaults(str(folder))["guidance_scale"] == 3.5  # latentdiff.json
    assert LatentPipeline.from_pretrained(folder).sampling_defaults["guidance_scale"] == 3.5
    assert LatentPipeline.from_pretrained(folder).sampling_defaults["guidance_interval"] == [0.0, 600.0]
    assert "| default guidance interval | timesteps 0 to 600 (unguided outside) |" in body
    assert LatentPipeline.from_pretrained(folder).sampling_defaults["negative_prompt"] == "a shape"
    assert LatentPipeline.from_pretrained(folder).sampling_defaults["negative_prompt_carry"] == " on an? \\w+ background$"
    assert '| default negative prompt | "a shape" (guidance steers away from it) |' in body
    assert "| default negative prompt carry | each prompt's match of ` on an? \\w+ background$` appended" in body
    assert 'negative_prompt="a shape"' in body  # the stock Diffusers snippet passes it by hand


def test_prepare_upload_lists_the_files_and_the_card(saved_run):
    folder = saved_run / "pipeline"
    (folder / "unet" / "stale_copy.bin").write_bytes(b"pickle")  # next to safetensors: left out
    try:
        prepared = prepare_upload(str(folder), repo_id="user/shapes-ldm")
    finally:
        (folder / "unet" / "stale_copy.bin").unlink()
    assert prepared.files == sorted([
        "README.md", "model_index.json", "samples.png", "config.yaml", "training_summary.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ])
    assert any(path.endswith("stale_copy.bin") for path in prepared.left_out)
    assert all(isinstance(operation, CommitOperationAdd) for operation in prepared.operations)
    (card_operation,) = [op for op in prepared.operations if op.path_in_repo == "README.md"]
    metadata, body = front_matter_and_body(card_operation.path_or_fileobj.decode())
    assert metadata["library_name"] == "diffusers"
    assert 'LatentPipeline.from_pretrained("user/shapes-ldm")' in body
    config_operation = next(op for op in prepared.operations if op.path_in_repo == "config.yaml")
    assert config_operation.path_or_fileobj == str(saved_run / "config.yaml")  # from the run folder


def test_prepare_upload_refuses_pickle_only_weights(saved_run, tmp_path):
    folder = tmp_path / "pipeline"
    LatentPipeline.from_pretrained(saved_run / "pipeline").save_pretrained(folder, model_card=False)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match=r"vae/diffusion_pytorch_model\.bin"):
        prepare_upload(str(folder))


class RecordingHub:
    """Stands in for the Hub: records HfApi.create_repo / create_commit calls (upload_folder's commit) and what was
    sent."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.sent: dict[str, bytes] = {}
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)
        # upload_folder runs as it is (it lists the folder and calls create_commit); its README check asks the Hub,
        # and with hf_xet installed it streams to the Hub directly instead of one create_commit.
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda *args, **kwargs: None)
        monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
        for name in ("upload_file", "preupload_lfs_files"):
            monkeypatch.setattr(HfApi, name, self.forbidden)

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
        for operation in operations:  # read now: the files of a temporary folder are gone afterwards
            source = operation.path_or_fileobj
            self.sent[operation.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        from types import SimpleNamespace

        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

    def forbidden(self, *args, **kwargs):
        raise AssertionError("only create_repo and upload_folder (its create_commit) may be used")


def test_push_to_hub_uploads_without_revealing_the_token(saved_run, monkeypatch, capsys, caplog):
    hub = RecordingHub(monkeypatch)
    pipe = LatentPipeline.from_pretrained(saved_run / "pipeline")
    with caplog.at_level(logging.DEBUG):
        url = pipe.push_to_hub("user/shapes-ldm", token=FAKE_TOKEN, private=True, commit_message="First upload")
    assert url == "https://huggingface.co/user/shapes-ldm/commit/0123abc"

    (name, repo_call), (name2, commit_call) = hub.calls
    assert (name, name2) == ("create_repo", "create_commit")
    assert repo_call["repo_id"] == "user/shapes-ldm" and repo_call["private"] is True
    assert repo_call["token"] == FAKE_TOKEN
    assert commit_call["commit_message"] == "First upload" and commit_call["token"] == FAKE_TOKEN
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples.png",
            "config.yaml"} <= set(hub.sent)
    assert not any(path.endswith((".bin", ".ckpt", ".pt")) for path in hub.sent)
    metadata, body = front_matter_and_body(hub.sent["README.md"].decode())
    assert metadata["pipeline_tag"] == "text-to-image" and "![Samples](samples.png)" in body
    assert json.loads(hub.sent["model_index.json"])["_class_name"] == "LatentPipeline"

    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    assert all(FAKE_TOKEN not in record.getMessage() for record in caplog.records)
    assert FAKE_TOKEN not in caplog.text


def test_push_command(saved_run, monkeypatch, capsys):
    from latentdiff.cli import main

    hub = RecordingHub(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = str(saved_run / "pipeline")

    assert main(["push", folder, "user/shapes-ldm", "--dry-run"]) == 0
    assert hub.calls == []  # a dry run sends nothing
    out = capsys.readouterr().out
    assert "would upload 14 files to user/shapes-ldm" in out and "unet/diffusion_pytorch_model.safetensors" in out

    assert main(["push", folder, "user/shapes-ldm", "--private"]) == 0
    assert [name for name, _ in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][1]["private"] is True
    captured = capsys.readouterr()
    assert "uploaded" in captured.out and FAKE_TOKEN not in captured.out + captured.err

    assert main(["push", str(saved_run / "missing"), "user/x"]) == 2
    assert "no folder at" in capsys.readouterr().err


def test_save_pretrained_writes_safetensors_only(tmp_path):
    from latentdiff.testing import tiny_components

    pipe = LatentPipeline(**tiny_components(seed=0))
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="needs `repo_id`"):
        pipe.save_pretrained(tmp_path, push_to_hub=True)
    pipe.sampling_defaults = {"guidance_scale": 2.5}
    pipe.save_pretrained(tmp_path, model_card={"base_model": "org/base", "license": "mit"})
    assert json.loads((tmp_path / "latentdiff.json").read_text()) == {"guidance_scale": 2.5}
    metadata, body = front_matter_and_body((tmp_path / "README.md").read_text())
    assert metadata["base_model"] == "org/base" and metadata["license"] == "mit"
    assert "| default guidance scale | 2.5 |" in body
    assert not [name for name in os.listdir(tmp_path / "unet") if not name.endswith((".json", ".safetensors"))]


def test_a_users_own_card_is_kept(saved_run, tmp_path):
    folder = tmp_path / "pipeline"
    pipe = LatentPipeline.from_pretrained(saved_run / "pipeline")
    pipe.save_pretrained(folder, model_card=ModelCard("---\nlicense: mit\n---\n\n# My model\n\nHand-written."))
    prepared = prepare_upload(str(folder))
    metadata, body = front_matter_and_body(str(prepared.card))
    assert "Hand-written." in body and metadata["license"] == "mit"
    assert metadata["library_name"] == "diffusers" and "latentdiff" in metadata["tags"]  # completed


def test_hub_mixin_is_used_by_both_pipelines():
    from latentdiff import LatentImg2ImgPipeline

    assert issubclass(LatentPipeline, PipelineHubMixin) and issubclass(LatentImg2ImgPipeline, PipelineHubMixin)
    with pytest.raises(FileNotFoundError, match="no folder at './does/not/exist'"):
        LatentPipeline.from_pretrained("./does/not/exist")
    with pytest.raises(ValueError, match="is a file"):
        LatentPipeline.from_pretrained(__file__)


@pytest.mark.parametrize(
    "path, message",
    [
        # not a valid Hub repo id (huggingface_hub's own validation): a local path, and missing
        ("runs/shapes/pipeline", "no folder at 'runs/shapes/pipeline'; expected a pipeline folder"),
        ("~/models/x", "no folder at '~/models/x'; expected a pipeline folder"),
        # a valid repo id whose first part is a folder here: a local path too, never a Hub look-up
        ("runs/nope", "no folder at 'runs/nope' (the folder 'runs' has no 'nope'); expected a pipeline folder"),
        # a valid repo id, no such folder, and the Hub off: both said in one line
        ("someone/nope", "no folder at 'someone/nope', and it cannot be loaded as a Hub repo id (the Hub is off"),
    ],
)
def test_a_missing_model_path_is_no_folder_at(path, message, tmp_path, monkeypatch):
    from latentdiff.cli import main
    from latentdiff.config import load_config
    from latentdiff.models import build_vae

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        LatentPipeline.from_pretrained(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    # the same for a component named in a training config, and on the command line
    config = load_config(overrides=[f"model.vae.pretrained={path}"]).model
    with pytest.raises(FileNotFoundError, match=f"model.vae.pretrained: no folder at {path!r}"):
        build_vae(config)
    assert main(["generate", path, "a red circle"]) == 2

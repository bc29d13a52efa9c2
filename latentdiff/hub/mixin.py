"""``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` of the latentdiff pipelines: Diffusers' own, after
latentdiff's checks (safetensors only, every component present)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard

from .card import make_model_card
from .loading import (
    CARD_FILE,
    DEFAULT_COMMIT_MESSAGE,
    SAMPLING_DEFAULTS_FILE,
    check_pipeline_folder,
    hub_load_error,
    locate_model,
    read_sampling_defaults,
)
from .upload import prepare_upload, upload

class PipelineHubMixin:
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` of the latentdiff pipelines.

    Listed before ``DiffusionPipeline`` in a pipeline's bases; each method adds its checks and then
    calls Diffusers' own.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs):
        """``DiffusionPipeline.from_pretrained`` with safe defaults and clear errors.

        Loads a folder or Hub repo of the Stable Diffusion 1.x / 2.x layout, or one saved by latentdiff
        (a ``text_encoder`` of class ``OpenCLIPTextModel`` or ``CLIPTextModelWithWordEmbeddings`` loads with
        latentdiff's class of that name). A local
        folder is checked first (:func:`check_pipeline_folder`): every component present, and no pickle
        weights unless ``allow_pickle=True``; from the Hub only safetensors weights are fetched unless
        ``allow_pickle=True``. Components the pipeline does not take, such as Stable Diffusion's
        ``safety_checker`` and ``feature_extractor``, are ignored (with a logged note). Other keyword
        arguments go to Diffusers (``torch_dtype``, ``revision``, components to use instead of loading them...).

        The model's sampling defaults (``latentdiff.json``) are available as ``pipe.sampling_defaults``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        use_safetensors = kwargs.pop("use_safetensors", None)
        if not allow_pickle:
            if use_safetensors is False:
                raise ValueError("use_safetensors=False loads pickle weights; pass allow_pickle=True to allow that")
            use_safetensors = True
        expected_here = "a pipeline folder (model_index.json and one subfolder per component) or a Hub repo id"
        if os.path.isfile(path):
            raise ValueError(f"{path!r} is a file; from_pretrained loads {expected_here}")
        # Components a folder may list that the pipeline never loads from it (IP-Adapter's come with the adapter).
        for name in getattr(cls, "_not_loaded_from_folders", ()):
            kwargs.setdefault(name, None)
        location = locate_model(path, f"{cls.__name__}.from_pretrained", expected_here)
        if location == "folder":
            expected, _ = cls._get_signature_keys(cls)
            check_pipeline_folder(
                path,
                [name for name in expected if name not in getattr(cls, "_not_loaded_from_folders", ())],
                optional_components=cls._optional_components,
                may_be_unlisted=getattr(cls, "_may_be_unlisted", ()),
                passed_components=[name for name in expected if name in kwargs],
                allow_pickle=allow_pickle,
                pipeline_name=cls.__name__,
            )
        try:
            pipeline = super().from_pretrained(path, use_safetensors=use_safetensors, **kwargs)
        except OSError as error:
            if location == "folder":
                raise
            raise hub_load_error(path, f"{cls.__name__}.from_pretrained", expected_here, error) from error
        pipeline.sampling_defaults = read_sampling_defaults(path) if os.path.isdir(path) else {}
        return pipeline

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        *,
        model_card: bool | ModelCard | Mapping[str, Any] = True,
        **kwargs: Any,
    ) -> None:
        """Save the components (safetensors only), ``model_index.json`` and the model card.

        Args:
            save_directory: The folder to write.
            model_card: ``True`` writes :func:`make_model_card` of the saved folder as ``README.md`` (run files
                are looked up in the folder and, when it is a run's ``output_dir``, its parent); a mapping gives that function's keyword arguments
                (``base_model``, ``training_summary``, ``repo_id``, ...); a ``ModelCard`` is written as is;
                ``False`` writes none.
            push_to_hub: Upload the folder afterwards to ``repo_id`` (a keyword argument, then required), with
                ``token``, ``private``, ``commit_message``, ``create_pr``.

        A non-empty ``sampling_defaults`` attribute (e.g. ``{"guidance_scale": 5.0}``) is written to
        ``latentdiff.json``.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False would write pickle weights; latentdiff saves safetensors only")
        push_keys = ("repo_id", "token", "private", "commit_message", "create_pr")
        push_kwargs = {key: kwargs.pop(key) for key in push_keys if key in kwargs}
        if push_to_hub and "repo_id" not in push_kwargs:
            raise ValueError("save_pretrained(push_to_hub=True) needs `repo_id`, e.g. repo_id='user/my-model'")
        super().save_pretrained(
            save_directory, safe_serialization=True, variant=variant, max_shard_size=max_shard_size, **kwargs
        )
        save_directory = os.fspath(save_directory)

        sampling_defaults = getattr(self, "sampling_defaults", None)
        if sampling_defaults:
            with open(os.path.join(save_directory, SAMPLING_DEFAULTS_FILE), "w", encoding="utf-8") as file:
                json.dump(dict(sampling_defaults), file, indent=2)
        if model_card is not False:
            if isinstance(model_card, ModelCard):
                card = model_card
            else:
                card_kwargs = dict(model_card) if isinstance(model_card, Mapping) else {}
                card_kwargs.setdefault("repo_id", push_kwargs.get("repo_id"))
                card = make_model_card(save_directory, **card_kwargs)
            card.save(os.path.join(save_directory, CARD_FILE))
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id")
            upload(prepare_upload(save_directory, repo_id=repo_id), repo_id, **push_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        commit_message: str = DEFAULT_COMMIT_MESSAGE,
        create_pr: bool = False,
        model_card: ModelCard | Mapping[str, Any] | None = None,
    ) -> str:
        """Save the pipeline to a temporary folder, with its model card, and upload it to ``repo_id``.

        The run files next to the folder the pipeline was loaded from (``config.yaml``,
        ``training_summary.json``, the sample grid) go into the card and the upload too.

        Args:
            repo_id: The Hub repository, created if needed (``private`` then applies).
            token: Handed to ``huggingface_hub`` only; ``None`` uses the saved login.
            model_card: A ``ModelCard`` to upload, or :func:`make_model_card` keyword arguments.

        Returns:
            The commit URL.
        """
        name_or_path = self.name_or_path
        source = name_or_path if isinstance(name_or_path, str) and os.path.isdir(name_or_path) else None
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "pipeline")
            self.save_pretrained(folder, model_card=False)
            card = model_card
            if not isinstance(card, ModelCard):
                card_kwargs = {"repo_id": repo_id, "source_folder": source, **(card or {})}
                card = make_model_card(folder, **card_kwargs)
            prepared = prepare_upload(folder, card=card, repo_id=repo_id, source_folder=source)
            return upload(
                prepared, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

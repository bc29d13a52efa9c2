"""The Hugging Face Hub side of a pipeline: loading checks (:mod:`.loading`), the model card (:mod:`.card`), the
upload (:mod:`.upload`) and the pipelines' Hub methods (:mod:`.mixin`); ``huggingface_hub`` does the work."""

from __future__ import annotations

from .card import make_model_card, write_model_card
from .loading import (
    PICKLE_SUFFIXES,
    TRAINING_CONFIG_FILE,
    UnsafeWeightsError,
    check_pipeline_folder,
    find_run_files,
    hub_load_error,
    locate_model,
    read_sampling_defaults,
)
from .mixin import PipelineHubMixin
from .upload import PreparedUpload, prepare_upload, push_folder_to_hub, upload

__all__ = [
    "PICKLE_SUFFIXES",
    "PipelineHubMixin",
    "PreparedUpload",
    "TRAINING_CONFIG_FILE",
    "UnsafeWeightsError",
    "check_pipeline_folder",
    "find_run_files",
    "hub_load_error",
    "locate_model",
    "make_model_card",
    "prepare_upload",
    "push_folder_to_hub",
    "read_sampling_defaults",
    "upload",
    "write_model_card",
]

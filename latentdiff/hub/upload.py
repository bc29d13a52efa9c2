"""The upload of a pipeline folder: what would be sent (:func:`prepare_upload`), then ``HfApi.upload_folder``
(:func:`upload`). A token is only ever handed to ``huggingface_hub``: it is never printed or logged."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from .card import make_model_card
from .loading import (
    CARD_FILE,
    DEFAULT_COMMIT_MESSAGE,
    DEFAULT_SAMPLE_GRID,
    DEFAULT_TAGS,
    MODEL_INDEX,
    PICKLE_SUFFIXES,
    _is_component_entry,
    _read_model_index,
    check_pipeline_folder,
    find_run_files,
)

logger = logging.getLogger("latentdiff.hub")

UPLOAD_IGNORE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + [".*", "*/.*"]
"""Never uploaded: pickle weights (a component must have safetensors) and hidden files."""

@dataclass
class PreparedUpload:
    """What :func:`upload` would send: one ``CommitOperationAdd`` per file, the card among them."""

    folder: str
    card: ModelCard
    operations: list[CommitOperationAdd] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    """Local files of the folder that are not uploaded (pickle weights, files of no component)."""

    @property
    def files(self) -> list[str]:
        """The paths in the repository, sorted."""
        return sorted(operation.path_in_repo for operation in self.operations)


def _ensure_card_metadata(card: ModelCard) -> ModelCard:
    """A user's own card keeps its text; the metadata the Hub needs to list the model is added if missing
    (Diffusers' ``populate_model_card``: ``library_name: diffusers`` and the tags)."""
    from diffusers.utils.hub_utils import populate_model_card

    card = populate_model_card(card, tags=list(DEFAULT_TAGS))
    if card.data.pipeline_tag is None:
        card.data.pipeline_tag = "text-to-image"
    return card


def prepare_upload(
    folder: str,
    *,
    card: ModelCard | None = None,
    repo_id: str | None = None,
    source_folder: str | None = None,
    sample_grid: str | None = DEFAULT_SAMPLE_GRID,
) -> PreparedUpload:
    """List the files to upload for a pipeline folder, without any network access.

    Uploaded: ``model_index.json``, the folder of every component it lists (safetensors and configs;
    pickle weights are left out), the card as ``README.md``, and the run files found next to ``folder``
    or ``source_folder`` (``config.yaml``, ``training_summary.json``, ``latentdiff.json``, the sample grid).
    The card is ``card`` if given, else the folder's ``README.md`` (its metadata completed where
    missing), else :func:`make_model_card` of the folder.

    Raises:
        FileNotFoundError, ValueError, UnsafeWeightsError: as :func:`check_pipeline_folder`.
    """
    folder = os.fspath(folder)
    model_index = _read_model_index(folder)
    components = [
        name
        for name, value in model_index.items()
        if not name.startswith("_") and _is_component_entry(value) and value[0] is not None
    ]
    # A pickle-only component cannot be uploaded as safetensors: refuse rather than send half a model.
    check_pipeline_folder(folder, components, pipeline_name="the upload")

    if card is None:
        card_path = os.path.join(folder, CARD_FILE)
        if os.path.isfile(card_path):
            card = _ensure_card_metadata(ModelCard.load(card_path))
        else:
            card = make_model_card(folder, repo_id=repo_id, source_folder=source_folder, sample_grid=sample_grid)

    prepared = PreparedUpload(folder=folder, card=card)
    prepared.operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode()))
    prepared.operations.append(
        CommitOperationAdd(path_in_repo=MODEL_INDEX, path_or_fileobj=os.path.join(folder, MODEL_INDEX))
    )
    component_files = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for component in components
        for root, _, names in os.walk(os.path.join(folder, component))
        for name in names
    )
    kept = set(filter_repo_objects(component_files, ignore_patterns=UPLOAD_IGNORE_PATTERNS))
    for in_repo in component_files:
        path = os.path.join(folder, *in_repo.split("/"))
        if in_repo in kept:
            prepared.operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
        else:
            prepared.left_out.append(path)
    for in_repo, path in find_run_files(folder, source_folder, sample_grid=sample_grid).items():
        prepared.operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))

    uploaded_top_level = {operation.path_in_repo.split("/")[0] for operation in prepared.operations}
    for entry in sorted(os.listdir(folder)):
        if entry not in uploaded_top_level and not entry.startswith("."):
            prepared.left_out.append(os.path.join(folder, entry))
    if prepared.left_out:
        logger.info("not uploaded: %s", ", ".join(prepared.left_out))
    return prepared


def upload(
    prepared: PreparedUpload,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
) -> str:
    """Send a :func:`prepare_upload` result: ``HfApi.create_repo`` (if needed), then one ``HfApi.upload_folder``.

    The files come from two places (the pipeline folder and the run folder above it) and the card from memory, so
    they are laid out as the repository will hold them in a temporary folder of links, which ``upload_folder``
    sends (pickle weights and hidden files ignored again by ``UPLOAD_IGNORE_PATTERNS``). ``token``
    goes to ``huggingface_hub`` only (``None``: the token saved by ``hf auth login``).

    Returns:
        The URL of the commit.
    """
    api = HfApi()
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    with tempfile.TemporaryDirectory() as staging:
        for operation in prepared.operations:
            path = os.path.join(staging, *operation.path_in_repo.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            source = operation.path_or_fileobj
            if isinstance(source, bytes):
                with open(path, "wb") as file:
                    file.write(source)
            else:
                os.symlink(os.path.abspath(source), path)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    logger.info("uploaded %d files to %s", len(prepared.operations), url)
    return url


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
    card: ModelCard | None = None,
    dry_run: bool = False,
) -> PreparedUpload | str:
    """Upload a saved pipeline folder: :func:`prepare_upload`, then :func:`upload` unless ``dry_run``.

    Returns:
        The commit URL, or for ``dry_run`` the :class:`PreparedUpload` (nothing is sent).
    """
    prepared = prepare_upload(folder, card=card, repo_id=repo_id)
    if dry_run:
        return prepared
    return upload(prepared, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr)

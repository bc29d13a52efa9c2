"""Folders written whole: a crash or an interrupted run never leaves a half-written model folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator


@contextlib.contextmanager
def folder_written_in_place(folder: str) -> Iterator[str]:
    """Yield a temporary folder beside ``folder`` to write into; on success it replaces ``folder`` by a rename.

    Until the rename the old ``folder`` (if any) stays as it was; an exception leaves it untouched and the
    temporary folder (``<folder>.partial``, cleared on the next write) behind. Written here because
    ``save_pretrained`` writes file by file into its target.
    """
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    yield partial
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)

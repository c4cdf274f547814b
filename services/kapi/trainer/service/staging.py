"""Removing what a killed job was writing aside: a bundle's or a dataset version's staging
directory, which would otherwise stay beside the real ones forever.

The writers rename a finished directory into place in one step, so a job that did not
succeed can have left only these. Call it once the job's processes are gone; where another
process may stage in the same folder (an ingest of the same name), it holds that writer's
lock while it looks, so a live writer's staging is never taken for a dead one's.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from kapi.core.files import locked
from kapi.trainer.service.jobs import Staging

log = logging.getLogger(__name__)


def remove_staging(stagings: Iterable[Staging]) -> list[Path]:
    """Remove every match; returns what was removed. Blocks while a writer holds the lock."""
    removed: list[Path] = []
    for staging in stagings:
        if not staging.folder.is_dir():
            continue
        with _locked(staging.lock):
            for path in sorted(staging.folder.glob(staging.pattern)):
                _remove(path)
                removed.append(path)
    if removed:
        log.info("removed what a stopped job left", extra={"paths": [str(p) for p in removed]})
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _locked(path: Path | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if path is None else locked(path)

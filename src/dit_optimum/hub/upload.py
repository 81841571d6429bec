"""Push one pipeline to the Hub with its card: the folder is staged (pipeline + card rendered from its results +
sample grid + results rows) and uploaded with ``huggingface_hub``; ``dry_run`` writes the staged folder instead.

The token comes from the standard places only (``HF_TOKEN`` or ``hf auth login``); it is never printed or written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants

from ..errors import DiTOptimumError
from ..files import UPLOAD_IGNORE_PATTERNS, copy_regular_files, save_directory
from ..schemas import RESULTS, FileContentError, SchemaError, check_repo_id, read_json_file
from ..utils import first_line
from .cards import RESULTS_FILE, SAMPLE_GRID, pick_row, repo_name
from .releases import sample_grid_bytes, write_card_files


def _read_results(path: Path) -> dict[str, Any]:
    # a benchmark results.json or a release's dit_optimum_results.json (the same rows, with who it is)
    try:
        return read_json_file(path, RESULTS)
    except SchemaError as error:
        raise DiTOptimumError(f"`results`={str(path)!r} is not a dit-optimum results file: {error.problem}.") from None
    except FileContentError as error:
        raise DiTOptimumError(f"`results`={str(path)!r} is not a readable results file ({error.problem}).") from None


def stage(
    pipeline_dir: str | Path,
    repo_id: str,
    target: Path,
    results: str | Path | None = None,
    technique: str | None = None,
    variant: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Fill the empty folder ``target`` with what ``push`` uploads: the pipeline's files (hidden ones left out), the
    card for ``repo_id`` rendered from the results (``results`` or the folder's own ``dit_optimum_results.json``),
    the sample grid and the release's rows of the results."""
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise DiTOptimumError(f"`pipeline_dir`={str(pipeline_dir)!r} is not a saved pipeline (no model_index.json).")
    source = Path(results) if results is not None else pipeline_dir / RESULTS_FILE
    if not source.exists():  # a FIFO or folder in its place is refused by the read
        raise DiTOptimumError(
            f"{str(pipeline_dir)!r} carries no {RESULTS_FILE}: pass `results` (a benchmark results.json) so that the "
            "card carries measured numbers."
        )
    results_data = _read_results(source)
    row = pick_row(results_data, source, technique, variant)
    if base_model is None and row["technique"] != "baseline":
        base_model = f"{repo_id.split('/')[0]}/{repo_name(row['variant'], 'baseline')}"
    # regular files inside the folder only: a link (to a token file, to a folder elsewhere) is never followed
    copy_regular_files(pipeline_dir, target, skip=("README.md", RESULTS_FILE, SAMPLE_GRID))
    if os.path.lexists(pipeline_dir / SAMPLE_GRID):
        grid = sample_grid_bytes(pipeline_dir, {"sample_grid": SAMPLE_GRID})
    else:
        grid = sample_grid_bytes(source.parent, row)
    write_card_files(target, results_data, row, repo_id, base_model, grid)
    return target


def require_token() -> str:
    """The token of the standard places (``HF_TOKEN``, ``hf auth login``), or a clear error before any upload."""
    token = get_token()
    if not token:
        raise DiTOptimumError(
            "No Hugging Face token: set HF_TOKEN or run `hf auth login` before pushing (nothing was uploaded)."
        )
    return token


def push(
    pipeline_dir: str | Path,
    repo_id: str,
    results: str | Path | None = None,
    *,
    private: bool = False,
    dry_run: str | Path | None = None,
    overwrite: bool = False,
    technique: str | None = None,
    variant: str | None = None,
    base_model: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload ``pipeline_dir`` with its card to ``repo_id`` (created if missing; ``private`` for a new one) and
    return the commit URL; with ``dry_run``, write exactly what would be uploaded into that folder instead.

    A missing token is refused before anything is staged or uploaded.
    """
    check_repo_id(repo_id)
    if base_model is not None:  # rendered into the card: a Hub id or nothing
        check_repo_id(base_model, "base_model")
    if dry_run is not None:
        with save_directory(dry_run, "model_index.json", overwrite, "dry_run") as staging:
            stage(pipeline_dir, repo_id, staging, results, technique, variant, base_model)
        return str(dry_run)
    require_token()  # before anything is staged
    with tempfile.TemporaryDirectory(prefix="dit-optimum-push-") as folder:
        staged = stage(pipeline_dir, repo_id, Path(folder), results, technique, variant, base_model)
        source = Path(results).name if results is not None else RESULTS_FILE
        return upload_folder(staged, repo_id, source, private=private, api=api)


def upload_folder(
    folder: str | Path, repo_id: str, source: str, *, private: bool = False, api: HfApi | None = None
) -> str:
    """Create ``repo_id`` if missing (``private`` when new) and upload ``folder`` (a staged or released pipeline
    with its card) as one commit naming the package version and the results file ``source``; the commit URL."""
    from .. import __version__

    token = require_token()  # checked even with a given `api`: an upload without credentials is refused the same way
    if api is None and hf_constants.HF_HUB_OFFLINE:
        raise DiTOptimumError(
            "Offline mode is on (HF_HUB_OFFLINE=1): nothing was uploaded. Unset it to push, or use --dry-run to "
            "write what would be uploaded."
        )
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"dit-optimum {__version__}: {repo_id} with the results of {source}",
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        )
    except (OSError, ValueError) as error:  # HTTP, network, offline and auth errors of huggingface_hub
        raise DiTOptimumError(f"Uploading to `repo_id`={repo_id!r} failed: {first_line(error)}") from error
    return str(getattr(commit, "commit_url", commit))

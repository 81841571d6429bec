"""A real Hugging Face-compatible server on 127.0.0.1 for tests: olah (``make setup`` installs it into
``.venv-olah``) serving local folders, each committed as a git repository, fully offline."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLAH = Path(os.environ.get("OLAH_CLI", ROOT / ".venv-olah" / "bin" / "olah-cli"))


def _git(folder: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True, text=True).stdout


def _publish(folder: Path, mirrors: Path, cache: Path, repo_id: str) -> None:
    # olah serves committed git objects from <mirrors>/models/<org>/<name>, branch main
    target = mirrors / "models" / repo_id
    shutil.copytree(folder, target)
    _git(target, "init", "-q", "-b", "main")
    _git(target, "add", "-A")
    _git(target, "commit", "-q", "-m", "release")
    sha = _git(target, "rev-parse", "HEAD").strip()
    # offline olah answers requests without a revision (what from_pretrained sends) from its cache only: seed it
    seed = cache / "api" / "models" / repo_id / "revision" / "main"
    seed.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    (seed / "meta_head.json").write_text(json.dumps({"sha": sha, "lastModified": now}))
    (seed / "resolved_commit.json").write_text(
        json.dumps({"status_code": 200, "headers": {}, "content": sha.encode().hex()})
    )


@contextlib.contextmanager
def local_hub(workdir: Path, repos: Mapping[str, Path], timeout: float = 60) -> Iterator[str]:
    """Serve ``repos`` ({repo id: folder}) at the yielded URL (use it as ``HF_ENDPOINT``) until the block ends."""
    if not OLAH.is_file():
        raise RuntimeError(f"{OLAH} is missing: `make setup` installs the local Hub server (olah) there.")
    mirrors, cache = workdir / "mirrors", workdir / "cache"
    for repo_id, folder in repos.items():
        _publish(Path(folder), mirrors, cache, repo_id)
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{cache}"\nmirrors-path = ["{mirrors}"]\n'
        "\n[accessibility]\noffline = true\n"
    )
    log = (workdir / "olah.log").open("w")
    process = subprocess.Popen(
        [str(OLAH), "-c", str(config), "--log-path", str(workdir / "logs")],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    ready = f"{url}/api/models/{next(iter(repos))}/revision/main"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"olah exited ({process.returncode}): {(workdir / 'olah.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(ready, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"olah did not answer {ready} within {timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

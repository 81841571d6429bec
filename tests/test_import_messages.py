"""What a user sees: `import dit_optimum` and `dit-optimum --help` print nothing but the help, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = ("benchmark", "evaluate", "architecture", "convert", "quantize", "prune", "release", "push", "export-space")


def _run(*args: str) -> subprocess.CompletedProcess:
    # as a user runs them: diffusers at its default verbosity (conftest.py lowers it for the test process)
    env = {key: value for key, value in os.environ.items() if key != "DIFFUSERS_VERBOSITY"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_import_prints_nothing():
    result = _run(sys.executable, "-c", "import dit_optimum")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_help_prints_only_help():
    result = _run(str(BIN / "dit-optimum"), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: dit-optimum")
    assert all(command in result.stdout for command in COMMANDS)


def test_subcommand_help_prints_only_help():
    # one process for all subcommands (each would spend seconds importing torch): the import prints nothing, and
    # each subcommand's help is all it prints
    code = (
        "import contextlib, io, sys\n"
        "from dit_optimum.cli import main\n"
        f"for command in {COMMANDS!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit as done:\n"
        "            assert done.code == 0, (command, done.code)\n"
        "    assert out.getvalue().startswith(f'usage: dit-optimum {command}'), (command, out.getvalue()[:80])\n"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_only_the_known_messages_and_only_during_import_are_hidden():
    # after the import the filters are gone: the same text logged later shows, and so does any other message
    code = (
        "import logging, dit_optimum\n"
        "logging.getLogger('torch.utils._pytree').warning('X is an Enum subclass and is now natively supported by "
        "torch.compile')\n"
        "logging.getLogger('diffusers.quantizers.torchao.torchao_quantizer').warning('Unable to import `torchao` "
        "Tensor objects')\n"
        "logging.getLogger('torch.utils._pytree').warning('another message')\n"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.splitlines()) == 3, result.stderr
    for text in ("natively supported", "Unable to import `torchao`", "another message"):
        assert text in result.stderr


def test_a_message_during_import_other_than_the_known_ones_still_shows():
    import logging

    from dit_optimum.import_messages import known_import_messages_hidden

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("torch.utils._pytree")
    handler = Collect()
    logger.addHandler(handler)
    try:
        with known_import_messages_hidden():
            logger.warning("<enum 'A'> is an Enum subclass and is now natively supported by torch.compile as ...")
            logger.warning("a different warning")
    finally:
        logger.removeHandler(handler)
    assert records == ["a different warning"]

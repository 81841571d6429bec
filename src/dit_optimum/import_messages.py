"""Hide the two messages that importing diffusers prints when torchao is installed, and only those.

diffusers imports its torchao quantizer (and so torchao) as soon as ``ModelMixin`` is imported, whenever torchao is
installed; no torchao release that installs beside torch 2.14 imports quietly (0.15-0.18 checked, 2026-12). torchao
then registers two ``Enum`` types with torch's pytree (torch logs a deprecation warning per type), and diffusers logs
"Unable to import ``torchao`` Tensor objects" because torchao 0.18 moved classes it adds to ``torch.load``'s safe
globals. Neither concerns this package: it reads and writes safetensors only (never ``torch.load``), and torch still
accepts the registration. Every other message, and these ones outside the import, still shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# (logger, text in the message) for each known import-time message
KNOWN_IMPORT_MESSAGES: tuple[tuple[str, str], ...] = (
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
)


class _KnownMessageFilter(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def known_import_messages_hidden() -> Iterator[None]:
    """While the block runs (the first import of diffusers), drop the known messages from their loggers."""
    installed = [(logging.getLogger(name), _KnownMessageFilter(text)) for name, text in KNOWN_IMPORT_MESSAGES]
    for logger, message_filter in installed:
        logger.addFilter(message_filter)
    try:
        yield
    finally:
        for logger, message_filter in installed:
            logger.removeFilter(message_filter)

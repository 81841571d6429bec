"""mkdocs hooks (``hooks:`` in mkdocs.yml): the files outside ``docs/`` that the guides link to are part of the site.

The guides link to them as they lie in the repository (``../BENCHMARKS.md`` from ``docs/models.md``), so the links
work on disk and on a code host; here each such file is added to the site at its repository path, and a guide's
``../`` links are pointed there (the guides sit directly in ``docs/``). A link to any other file outside ``docs/``
stays broken and fails ``mkdocs build --strict``: add the file to ``OUTSIDE_FILES``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

OUTSIDE_FILES = (
    "BENCHMARKS.md",
    "model_cards/example-dit-xs4-int8.md",
    "model_cards/samples.png",
    "model_cards/dit_optimum_results.json",
    "demo/screenshot.png",
)
_PARENT_LINK = re.compile(r"(\]\()\.\./")


def on_files(files, config):
    root = Path(config.config_file_path).parent
    for name in OUTSIDE_FILES:
        files.append(
            File(name, src_dir=str(root), dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls)
        )
    return files


def on_page_markdown(markdown, page, config, files):
    if "/" in page.file.src_uri or page.file.src_uri in OUTSIDE_FILES:
        return markdown
    return _PARENT_LINK.sub(r"\1", markdown)

"""docs/BENCHMARKS.md: each benchmark rewrites its own `## ` section, no other."""

from __future__ import annotations

import os
import re

from ringtail.ioring.files import write_file_atomically

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "docs", "BENCHMARKS.md")
_DOC_HEAD = "# Benchmarks\n\nReproducible benchmarks; each section names the script that writes it.\n"


def update_section(title: str, section: str, path: str = DOC_PATH) -> None:
    """Replace the section headed `title` (or append it); keep every other section.

    Written to a temporary file and renamed, so a failed run never leaves half a doc.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        text = _DOC_HEAD
    section = section.rstrip("\n") + "\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = re.search(r"^## ", text[start + len(title):], re.MULTILINE)
        end = len(text) if following is None else start + len(title) + following.start()
        text = text[:start] + section + ("\n" if end < len(text) else "") + text[end:]
    write_file_atomically(path, text.encode("utf-8"), mode=0o644)

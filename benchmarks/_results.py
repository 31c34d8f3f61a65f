"""Writing a benchmark's result JSON (shared by the scripts in this folder)."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result, path):
    """Write ``result`` as indented JSON to ``path`` ('' or None: do not write)."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")

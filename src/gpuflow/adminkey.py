"""The admin API key of a data directory: from GPUFLOW_ADMIN_KEY, or generated once."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ADMIN_KEY_FILE = "admin.key"


def load_or_create_admin_key(data_dir: Path) -> tuple[str, bool]:
    """(key, created): reads ``<data_dir>/admin.key``, creating it (mode 0600) the first time."""
    path = Path(data_dir) / ADMIN_KEY_FILE
    if path.is_file():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"gf_admin_{secrets.token_urlsafe(24)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True

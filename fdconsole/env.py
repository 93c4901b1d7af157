"""Typed settings from the environment; a bad value fails loudly with ImproperlyConfigured."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be 0 or 1 (got {raw!r})")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer (got {raw!r})") from None


def secret_key(path: Path) -> str:
    """FD_SECRET_KEY, else a key generated once and kept in ``path`` (never in the repository), which
    only its owner may read."""
    key = os.environ.get("FD_SECRET_KEY")
    if key:
        return key
    if not path.exists():
        # A process started at the same moment may write its key first: then both use that one.
        write_private(path, secrets.token_urlsafe(50), keep_existing=True)
    return path.read_text().strip()


def write_private(path: Path, text: str, keep_existing: bool = False) -> bool:
    """Put ``text`` in ``path`` with mode 0600 from its first byte, whatever the umask: it is written
    to a new file beside it (mkstemp's, which no other user can open) and then moved into place whole,
    so that no reader ever sees it partly written. With ``keep_existing``, a file already at ``path``
    stays as it is; returns whether ``text`` went in."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)  # mkstemp asks for 0600, which a umask can only narrow
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        if not keep_existing:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails, changing nothing, when path exists
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

"""Hashed DICOM identifiers: raw PatientID, study and series UIDs never leave ``readers.dicom``; the manifest holds
``hash_id(value)``, a keyed hash (HMAC-SHA256, 12 hex digits) whose key is a secret kept outside run directories
(``ONCOTRANSFER_ID_SALT``, else a random key created once in ``~/.config/oncotransfer/id_salt``)."""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from oncotransfer.data.readers.base import ImageReadError, one_line
from oncotransfer.errors import ConfigError

_KEYS: dict[str, bytes] = {}


MIN_SALT = 16  # bytes: a shorter HMAC key could be guessed, and with it every short hospital id from its hash
_SALT_HINT = "python -c 'import secrets; print(secrets.token_hex(32))'"


def _salt() -> bytes:
    env = os.environ.get("ONCOTRANSFER_ID_SALT")
    if env is not None:  # as given (hashes made with it stay the same), but not empty or short
        if len(env.strip().encode()) < MIN_SALT:
            raise ConfigError(f"ONCOTRANSFER_ID_SALT holds {len(env.strip().encode())} bytes: the id-hashing key "
                              f"needs at least {MIN_SALT} random bytes; set it to e.g. the output of {_SALT_HINT}, "
                              "or unset it to use the key in ~/.config/oncotransfer/id_salt")
        return env.encode()
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "oncotransfer"
    f = home / "id_salt"
    if str(f) in _KEYS:
        return _KEYS[str(f)]
    if not os.path.lexists(f):
        home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=".id_salt.")  # mode 600
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:  # created once and whole: a concurrent creator's link wins and both read its key
            os.link(tmp, f)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    _KEYS[str(f)] = _read_salt_file(f)
    return _KEYS[str(f)]


def _read_salt_file(f: Path) -> bytes:
    """The key in ``f``: a regular file of 16 bytes to 4 KB (a FIFO, device or huge file is refused, not read)."""
    how = (f"delete it (a new key is made; hashes from the old key will differ) or set ONCOTRANSFER_ID_SALT "
           f"(e.g. to the output of {_SALT_HINT})")
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"id-hashing key file {f}: cannot read it ({e.strerror}); {how}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"id-hashing key file {f} is not a regular file; {how}")
        key = os.read(fd, 4097).strip()
    finally:
        os.close(fd)
    if len(key) > 4096 or len(key) < MIN_SALT:
        raise ConfigError(f"id-hashing key file {f} holds {'over 4096' if len(key) > 4096 else len(key)} bytes, "
                          f"expected {MIN_SALT} to 4096; {how}")
    return key


def hash_id(value: str, kind: str = "p") -> str:
    """``p-1a2b3c4d5e6f``: a keyed hash of a patient (``p``), study (``st``) or series (``se``) id."""
    return f"{kind}-{hmac.new(_salt(), value.encode(), hashlib.sha256).hexdigest()[:12]}"



MAX_ID = 64  # characters: the longest LO (PatientID) or UI (study, series UID) value DICOM allows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def identifier(ds, key: str, kind: str, path: str | Path) -> str | None:
    """``hash_id`` of the header's ``key`` (None when absent); a value no DICOM writer makes (longer than 64
    characters, or holding control characters) is refused with one line that never shows it."""
    try:
        v = str(ds.get(key, "") or "").strip()
    except Exception as e:  # a value that cannot be decoded
        raise ImageReadError(f"{path}: unreadable {key} ({one_line(e)})") from None
    if len(v) > MAX_ID or _CONTROL.search(v):
        why = f"{len(v)} characters, at most {MAX_ID}" if len(v) > MAX_ID else "control characters"
        raise ImageReadError(f"{path}: {key} is not a valid DICOM identifier ({why}); fix the header, or remove "
                             "the file")
    return hash_id(v, kind) if v else None

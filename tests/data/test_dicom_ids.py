"""The id-hashing key must be long enough and read safely; hostile DICOM identifiers never reach output raw."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")

from oncotransfer.data.readers import ImageReadError  # noqa: E402
from oncotransfer.data.readers import dicom as D  # noqa: E402
from oncotransfer.errors import ConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "hostile"))
from outputs import dicom  # noqa: E402


@pytest.fixture
def key_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("ONCOTRANSFER_ID_SALT", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "oncotransfer").mkdir()
    return tmp_path / "oncotransfer" / "id_salt"


@pytest.mark.parametrize("value", ["", "   ", "short", "x" * 15])
def test_short_or_empty_salt_variable_is_refused(monkeypatch, value: str) -> None:
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", value)
    with pytest.raises(ConfigError, match="ONCOTRANSFER_ID_SALT .* at least 16"):
        D.hash_id("MRN1")


def test_long_salt_variable_is_the_key(monkeypatch) -> None:
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", "k" * 16)
    assert D.hash_id("MRN1").startswith("p-")


@pytest.mark.parametrize("content", [b"", b"\n", b"0123456789"])
def test_short_salt_file_is_refused(key_home: Path, content: bytes) -> None:
    key_home.write_bytes(content)
    with pytest.raises(ConfigError, match="id-hashing key file .* expected 16 to 4096"):
        D.hash_id("MRN1")


def test_huge_salt_file_is_refused_without_reading_it(key_home: Path) -> None:
    key_home.write_bytes(b"a" * 10_000_000)
    with pytest.raises(ConfigError, match="over 4096"):
        D.hash_id("MRN1")


@pytest.mark.parametrize("special", ["fifo", "device", "dir", "dangling"])
def test_salt_file_that_is_not_a_regular_file_is_refused_at_once(key_home: Path, special: str) -> None:
    if special == "fifo":
        os.mkfifo(key_home)
    elif special == "device":
        key_home.symlink_to("/dev/zero")
    elif special == "dir":
        key_home.mkdir()
    else:
        key_home.symlink_to(key_home.parent / "nowhere")
    result: list = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(ConfigError, D.hash_id, "MRN1")), daemon=True)
    t.start()
    t.join(10)
    assert result, "reading the key file hung"
    assert str(key_home) in str(result[0].value)


def _dicom(path: Path, **ids: str) -> Path:
    """A small ultrasound object with patient MRN1 and ``ids`` over the defaults (the hostile suite's builder)."""
    return dicom(path, **{"PatientID": "MRN1", **ids})


@pytest.mark.parametrize("key,value", [("PatientID", "MRN\x1b]0;owned\x07"), ("PatientID", "M" * 65),
                                       ("StudyInstanceUID", "1.2\r\n3"), ("SeriesInstanceUID", "1." * 40)])
def test_hostile_identifier_is_refused_without_showing_it(tmp_path, monkeypatch, key: str, value: str) -> None:
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", "tests-salt-of-16+bytes")
    p = _dicom(tmp_path / "x.dcm", **{key: value})
    with pytest.raises(ImageReadError) as e:
        D.read_info(p)
    assert key in str(e.value) and value not in str(e.value) and "\x1b" not in str(e.value)


def test_valid_identifiers_hash_and_shown_values_are_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", "tests-salt-of-16+bytes")
    info = D.read_info(_dicom(tmp_path / "x.dcm", Manufacturer="V\x1b[2J" + "v" * 60))
    assert info.patient == D.hash_id("MRN1") and info.study == D.hash_id("1.2.3", "st")
    assert "\x1b" not in info.manufacturer and len(info.manufacturer) <= 64


def test_probing_a_hostile_identifier_warns_nothing_that_quotes_it(tmp_path, monkeypatch) -> None:
    """pydicom warns on a bad UI/LO value by quoting it: data inspect's probe must not pass the raw id on."""
    import warnings

    from oncotransfer.data.readers import probe
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", "tests-salt-of-16+bytes")
    value = "1." * 40
    p = _dicom(tmp_path / "x.dcm", SeriesInstanceUID=value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError) as e:
            probe(str(p))
    assert value not in str(e.value)
    assert not [w for w in caught if value in str(w.message)]

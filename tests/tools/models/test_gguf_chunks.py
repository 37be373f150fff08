"""scripts/gguf_chunks.py: split a packaged GGUF into parts and join them back, verified."""

import importlib.util
import json
from pathlib import Path

import pytest

from flexprefill_tools import models
from flexprefill_tools.models.packages import sha256_file

_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "gguf_chunks.py"
_spec = importlib.util.spec_from_file_location("gguf_chunks", _SCRIPT)
gguf_chunks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gguf_chunks)

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("parts")
    assert gguf_chunks.main(["split", NAME, str(out), "--chunk-mb", "30"]) == 0
    return out


def test_split_writes_bounded_parts_and_checksum(parts):
    files = sorted(parts.glob(f"{NAME}.gguf.part*"))
    assert [f.name[-6:] for f in files] == ["part00", "part01", "part02", "part03"]
    assert all(f.stat().st_size <= 30 << 20 for f in files)
    src = models.gguf_path(NAME)
    assert sum(f.stat().st_size for f in files) == src.stat().st_size
    assert (parts / f"{NAME}.sha256").read_text().split()[0] == sha256_file(src)


def test_join_restores_the_file(parts, tmp_path, capsys):
    assert gguf_chunks.main(["join", str(parts), NAME, str(tmp_path)]) == 0
    joined = Path(capsys.readouterr().out.strip())
    assert joined == tmp_path / f"{NAME}.gguf"
    assert sha256_file(joined) == sha256_file(models.gguf_path(NAME))


def test_join_rejects_a_corrupt_part(parts, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in parts.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with open(bad / f"{NAME}.gguf.part02", "r+b") as f:
        f.seek(100)
        f.write(b"corrupt")
    dest = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="part is corrupt"):
        gguf_chunks.join(bad, NAME, dest)
    assert not dest.exists() and list(tmp_path.glob(".out.gguf.tmp*")) == []
    assert gguf_chunks.main(["join", str(bad), NAME, str(dest)]) == 1
    assert "error:" in capsys.readouterr().err


def test_join_reports_a_missing_part(parts, tmp_path):
    for f in parts.iterdir():
        if not f.name.endswith("part01"):
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match=r"parts \[1\]"):
        gguf_chunks.join(tmp_path, NAME, tmp_path / "out.gguf")


def test_manifest_lists_every_part(parts):
    manifest = json.loads((parts / f"{NAME}.manifest.json").read_text())
    files = sorted(parts.glob(f"{NAME}.gguf.part*"))
    assert [p["file"] for p in manifest["parts"]] == [f.name for f in files]
    assert [p["size"] for p in manifest["parts"]] == [f.stat().st_size for f in files]
    assert manifest["sha256"] == sha256_file(models.gguf_path(NAME)) and manifest["size"] == sum(p["size"] for p in manifest["parts"])


def test_check_reports_missing_and_corrupt_parts(parts, tmp_path, capsys):
    assert gguf_chunks.main(["check", str(parts), NAME]) == 0
    assert "4/4 parts intact" in capsys.readouterr().out
    # parts arriving one at a time: the ones there are checked, the others listed as missing
    for f in parts.iterdir():
        if not f.name.endswith(("part01", "part02", "part03")):
            (tmp_path / f.name).symlink_to(f)
    assert gguf_chunks.check(tmp_path, NAME)["missing"] == [f"{NAME}.gguf.part0{i}" for i in (1, 2, 3)]
    assert gguf_chunks.main(["check", str(tmp_path), NAME]) == 2
    bad = tmp_path / f"{NAME}.gguf.part01"
    bad.write_bytes(b"x" * (parts / bad.name).stat().st_size)
    assert gguf_chunks.check(tmp_path, NAME)["corrupt"] == [bad.name]
    assert gguf_chunks.main(["check", str(tmp_path), NAME]) == 1


def test_join_names_the_corrupt_part_from_the_manifest(parts, tmp_path):
    for f in parts.iterdir():
        if not f.name.endswith("part02"):
            (tmp_path / f.name).symlink_to(f)
    data = bytearray((parts / f"{NAME}.gguf.part02").read_bytes())
    data[10] ^= 0xFF
    (tmp_path / f"{NAME}.gguf.part02").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"part02 has sha256 .* this part is corrupt"):
        gguf_chunks.join(tmp_path, NAME, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_split_of_a_copy_is_checked_against_the_published_checksum(tmp_path):
    src = models.gguf_path(NAME)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(src.read_bytes())
    parts = gguf_chunks.split(NAME, tmp_path / "out", chunk_mb=60, source=copy)
    assert b"".join(p.read_bytes() for p in parts) == src.read_bytes()
    with open(copy, "r+b") as f:
        f.seek(100)
        f.write(b"x")
    with pytest.raises(ValueError, match="expected"):
        gguf_chunks.split(NAME, tmp_path / "bad", chunk_mb=60, source=copy)

"""The chunked transport of benchmarks/vllm/offline.py: cut, receive, join, checksums, the slim wheel."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vllm" / "offline.py"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("vllm_offline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "CARRY", tmp_path / "carry")
    monkeypatch.setattr(mod, "STASH", tmp_path / "stash")
    return mod


def _files(tmp_path, sizes):
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(n)))
        out.append(("wheel" if i else "gguf", p, p.name))
    return out


def _carry(src, man, names):
    """What one device call sees: the manifest and the named chunks of ``src`` in its .vllm_carry/."""
    call = src.parent / "call"
    call.mkdir(exist_ok=True)
    for old in call.iterdir():
        old.unlink()
    (call / "manifest.json").write_text(json.dumps(man))
    for n in names:
        (call / n).write_bytes((src / n).read_bytes())
    return call


def test_cut_receive_join_round_trip_one_chunk_per_call(offline, tmp_path, monkeypatch):
    files = _files(tmp_path, [1000, 5, 2500, 0, 777])
    man = offline.cut(files, offline.CARRY, 600)
    assert [c["size"] for c in man["chunks"]] == [600] * 7 + [82] and man["total"] == 4282
    carried = offline.CARRY
    for c in man["chunks"]:
        monkeypatch.setattr(offline, "CARRY", _carry(carried, man, [c["name"]]))
        offline.receive()
    paths = offline._join(man)
    for _, p, name in files:
        assert paths[name].read_bytes() == p.read_bytes()


def test_a_missing_or_corrupt_chunk_is_refused(offline, tmp_path, monkeypatch):
    files = _files(tmp_path, [1500])
    man = offline.cut(files, offline.CARRY, 600)
    carried = offline.CARRY
    call = _carry(carried, man, ["chunk-000"])
    monkeypatch.setattr(offline, "CARRY", call)
    offline.receive()
    with pytest.raises(SystemExit, match="missing"):
        offline._join(man)
    (call / "chunk-001").write_bytes(b"x" * 600)
    with pytest.raises(SystemExit, match="sha256"):
        offline.receive()


def test_slim_wheel_drops_the_listed_objects_and_their_record_lines(offline, tmp_path):
    whl = tmp_path / "vllm-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    keep = "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"
    with zipfile.ZipFile(whl, "w") as z:
        for name in (*offline.SLIM_DROP, keep):
            z.writestr(name, b"\0" * 10)
        z.writestr("vllm-0.24.0.dist-info/RECORD", "\n".join(f"{n},sha256=x,10" for n in (*offline.SLIM_DROP, keep)))
    slim = offline._slim(whl)
    with zipfile.ZipFile(slim) as z:
        assert set(z.namelist()) == {keep, "vllm-0.24.0.dist-info/RECORD"}
        assert z.read("vllm-0.24.0.dist-info/RECORD").decode().split(",")[0] == keep

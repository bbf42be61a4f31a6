"""Fetch the official MVTec AD archive (resumable, checksummed) and unpack only the chosen categories, safely.

Usage: ``python -m data_prep.mvtec --root DIR [--categories hazelnut carpet zipper] [--archive PATH_OR_URL]``.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import lzma
import posixpath
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from helpers.data import DatasetError

MVTEC_URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz")
MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_SIZE = 5_264_982_680  # bytes
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
DEFAULT_CATEGORIES = ("hazelnut", "carpet", "zipper")
# Short, so that a machine without network fails at once; a stalled transfer also gives up after this long.
NETWORK_TIMEOUT_S = 15
CHUNK_BYTES = 1 << 20
REPORT_EVERY_BYTES = 256 << 20


def prepare(root: str | Path, categories=DEFAULT_CATEGORIES, archive: str | Path | None = None,
            sha256: str = MVTEC_SHA256) -> Path:
    """Make ``root/<category>`` for every category; ``archive`` is a local file (no download) or a URL.

    Categories already present are skipped; when all are present nothing is downloaded or read.
    """
    root = Path(root)
    categories = [_category_name(c) for c in categories]
    missing = [c for c in categories if not (root / c).exists()]
    for category in sorted(set(categories) - set(missing)):
        print(f"{root / category}: already present, skipped", file=sys.stderr)
    if not missing:
        return root
    root.mkdir(parents=True, exist_ok=True)
    source = MVTEC_URL if archive is None else str(archive)
    if source.startswith(("http://", "https://")):
        archive_path = fetch(source, root, sha256, by_hand=_by_hand_hint(root, categories))
    else:
        archive_path = Path(source)
        if not archive_path.is_file():
            raise DatasetError(f"archive {archive_path} does not exist")
        try:
            verify_sha256(archive_path, sha256)
        except DatasetError as exc:
            # The file is the user's own: leave it where it is rather than rename or delete it.
            raise DatasetError(f"{exc}; it is not used (left in place)") from None
    extract_categories(archive_path, root, missing)
    return root


def fetch(url: str, root: Path, sha256: str, by_hand: str = "") -> Path:
    """Download ``url`` into ``root`` (resuming ``<name>.part``) and return it once its checksum matches.

    A file whose checksum does not match is renamed ``<name>.bad`` and never used.
    """
    target = root / (PurePosixPath(urllib.parse.urlparse(url).path).name or ARCHIVE_NAME)
    expected_size = MVTEC_SIZE if sha256.lower() == MVTEC_SHA256 else None
    if not target.is_file():
        part = target.with_name(target.name + ".part")
        download(url, part, expected_size, by_hand)
        part.replace(target)
    try:
        verify_sha256(target, sha256, expected_size)
    except DatasetError as exc:
        bad = target.with_name(target.name + ".bad")
        target.replace(bad)
        # A link that has moved often answers with a web page instead of the archive, hence the hint.
        raise DatasetError(f"{exc}; renamed it to {bad} and did not use it. {by_hand}") from None
    return target


def download(url: str, part: Path, expected_size: int | None = None, by_hand: str = "") -> None:
    """Append the rest of ``url`` to ``part``, asking the server for the missing bytes only (HTTP Range)."""
    have = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and have >= expected_size:
        return  # complete already (or too long, which the checksum will tell)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after byte `have`: the part file is the whole archive
            return
        raise DatasetError(f"cannot download {url} (HTTP {exc.code} {exc.reason}). {by_hand}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(f"cannot download {url} ({getattr(exc, 'reason', exc)}). {by_hand}") from None
    with response:
        resumed = have > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DatasetError(f"{url} answered {response.headers.get('Content-Range')!r} to a request for bytes "
                               f"{have}-; delete {part} and rerun")
        have = have if resumed else 0  # a server that ignores Range sends everything again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else expected_size
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - have > free:
            raise DatasetError(f"{part.parent} has {free / 1e9:.1f} GB free; the download needs "
                               f"{(total - have) / 1e9:.1f} GB more")
        print(f"downloading {url} to {part}" + (f", resuming at byte {have}" if resumed else ""), file=sys.stderr)
        written, reported = have, have
        with open(part, "ab" if resumed else "wb") as out:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    written += len(chunk)
                    if written - reported >= REPORT_EVERY_BYTES:
                        print(f"  {written / 1e9:.2f} of {(total or 0) / 1e9:.2f} GB", file=sys.stderr)
                        reported = written
            except (OSError, http.client.HTTPException) as exc:
                raise DatasetError(f"download of {url} stopped at byte {written} ({exc}); "
                                   f"rerun the same command to resume from {part}") from None
    if total is not None and written != total:
        raise DatasetError(f"download of {url} ended at byte {written} of {total}; "
                           f"rerun the same command to resume from {part}")


def verify_sha256(path: Path, sha256: str, expected_size: int | None = None) -> None:
    """Raise ``DatasetError`` unless the file's SHA-256 (read in chunks, never whole) is ``sha256``."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:  # fails in a moment instead of hashing 5 GB
        raise DatasetError(f"{path} holds {size} bytes, expected {expected_size} (checksum cannot match)")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256.lower():
        raise DatasetError(f"checksum mismatch for {path}: SHA-256 is {digest}, expected {sha256.lower()}")


def extract_categories(archive: Path, root: Path, categories) -> None:
    """Unpack members ``[top/]<category>/...`` into a temporary folder inside ``root``, then rename each category
    into place, so that a failure (an unsafe member, a corrupt archive) leaves no half-extracted category."""
    wanted = set(categories)
    found: dict[str, Path] = {}  # category -> its folder inside the staging folder
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=root))
    try:
        # Stream mode reads the 5 GB archive once, front to back; every check runs before its member is written.
        with tarfile.open(archive, "r|xz") as tar:
            for member in tar:
                parts = _safe_parts(member)
                category, top = _category_of(parts, wanted)
                if category is None:
                    continue
                _check_link(member, parts, (*top, category))
                folder = staging.joinpath(*top, category)
                if found.setdefault(category, folder) != folder:
                    raise DatasetError(f"archive {archive} holds {category} both at {found[category]} and {folder}")
                if member.isdir():  # made here, not by tarfile, so that a read-only folder mode cannot block its files
                    staging.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                else:
                    tar.extract(member, staging, filter="data")  # the "data" filter is a second guard
        absent = sorted(c for c in wanted if not found.get(c, staging / ".absent").is_dir())
        if absent:
            raise DatasetError(f"archive {archive} holds no category folder {', '.join(absent)}")
        for category, folder in sorted(found.items()):
            folder.rename(root / category)
            print(f"{root / category}: extracted", file=sys.stderr)
    except tarfile.FilterError as exc:
        refused = exc.tarinfo.name if exc.tarinfo else "?"
        raise DatasetError(f"archive {archive}: member {refused!r} refused ({exc}); nothing extracted") from None
    except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        raise DatasetError(f"archive {archive} cannot be read as .tar.xz ({exc}); nothing extracted") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path components; raises for any member that could land outside the destination."""
    def refuse(why: str):
        return DatasetError(f"unsafe archive member {member.name!r}: {why}; refusing to extract, nothing extracted")

    if member.name.startswith("/"):
        raise refuse("absolute path")
    parts = tuple(p for p in PurePosixPath(member.name).parts if p != ".")
    if ".." in parts:
        raise refuse("'..' in its path")
    if member.isdev():
        raise refuse("device file or fifo")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise refuse(f"unsupported member type {member.type!r}")
    return parts


def _category_of(parts: tuple[str, ...], wanted: set[str]) -> tuple[str | None, tuple[str, ...]]:
    """The chosen category a member belongs to and the top folder above it (MVTec has none; repacks may)."""
    for depth in (0, 1):
        if len(parts) > depth and parts[depth] in wanted:
            return parts[depth], parts[:depth]
    return None, ()


def _check_link(member: tarfile.TarInfo, parts: tuple[str, ...], category_parts: tuple[str, ...]) -> None:
    """Refuse a symlink or hardlink whose target is not inside the member's own category folder."""
    if not (member.issym() or member.islnk()):
        return
    # A symlink target is relative to the link's folder; a hardlink target names another member of the archive.
    base = PurePosixPath(*parts[:-1]) if member.issym() else PurePosixPath()
    target = posixpath.normpath(str(base / member.linkname)).split("/")
    if member.linkname.startswith("/") or ".." in target or tuple(target[:len(category_parts)]) != category_parts:
        raise DatasetError(f"unsafe archive member {member.name!r}: links to {member.linkname!r}, outside "
                           f"{'/'.join(category_parts)}; refusing to extract, nothing extracted")


def _category_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise DatasetError(f"{name!r} is not a category name")
    return name


def _by_hand_hint(root: Path, categories) -> str:
    return (f"If it cannot be downloaded here, download it with a browser from {MVTEC_PAGE} and run: "
            f"python -m data_prep.mvtec --root {root} --categories {' '.join(categories)} "
            f"--archive /path/to/{ARCHIVE_NAME}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="dataset folder; categories land in ROOT/<category>")
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    parser.add_argument("--archive", help="the archive as a local file (no download) or a URL (default: official URL)")
    parser.add_argument("--sha256", default=MVTEC_SHA256, help="expected SHA-256 of the archive")
    args = parser.parse_args(argv)
    try:
        prepare(args.root, args.categories, args.archive, args.sha256)
    except (DatasetError, OSError) as exc:  # a bad archive or argument, no network, a full disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

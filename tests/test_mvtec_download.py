"""MVTec AD preparation without the real 5 GB archive: small .tar.xz files built here, served locally if needed."""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_prep.mvtec import main, prepare
from helpers.data import DatasetError, list_categories, list_samples
from helpers.paths import ROOT
from tests.conftest import write_tiny_mvtec


def make_archive(tmp_path: Path, top: str = "", extra_members=()) -> Path:
    """A tiny MVTec-layout .tar.xz (categories alpha, beta, gamma) with optional hand-made members appended."""
    source = write_tiny_mvtec(tmp_path / "source", categories=("alpha", "beta", "gamma"), n_train=3, n_good=1,
                              n_defect=1, size=16)
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for category in ("alpha", "beta", "gamma"):
            tar.add(source / category, arcname=f"{top}/{category}" if top else category)
        tar.addfile(tarfile.TarInfo(f"{top}/license.txt" if top else "license.txt"), io.BytesIO())
        for info, data in extra_members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return archive


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def member(name: str, type=tarfile.REGTYPE, linkname: str = "", data: bytes = b"") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type, linkname, len(data)
    return info, data


@pytest.mark.parametrize("top", ["", "mvtec_anomaly_detection", "."])
def test_extracts_only_the_chosen_categories(tmp_path, top):
    archive = make_archive(tmp_path, top=top)
    root = tmp_path / "data"
    assert prepare(root, ["alpha", "gamma"], archive=archive, sha256=sha256_of(archive)) == root
    assert sorted(p.name for p in root.iterdir()) == ["alpha", "gamma"]  # no staging folder or license left over
    assert list_categories(root) == ["alpha", "gamma"]
    samples = list_samples(root, "gamma")
    assert len(samples) == 3 + 1 + 2 and sum(s.label for s in samples) == 2


def test_present_categories_are_skipped_without_reading_the_archive(tmp_path):
    archive = make_archive(tmp_path)
    root = tmp_path / "data"
    prepare(root, ["alpha"], archive=archive, sha256=sha256_of(archive))
    marker = root / "alpha" / "kept.txt"
    marker.write_text("untouched")
    prepare(root, ["alpha"], archive=tmp_path / "does-not-exist.tar.xz", sha256="0" * 64)
    assert marker.read_text() == "untouched"
    prepare(root, ["alpha", "beta"], archive=archive, sha256=sha256_of(archive))
    assert list_categories(root) == ["alpha", "beta"] and marker.exists()


def test_checksum_mismatch_extracts_nothing_and_keeps_the_local_file(tmp_path, capsys):
    archive = make_archive(tmp_path)
    root = tmp_path / "data"
    assert main(["--root", str(root), "--categories", "alpha", "--archive", str(archive), "--sha256", "0" * 64]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not any(root.iterdir())
    assert archive.is_file()


@pytest.mark.parametrize("bad", [
    member("../evil.txt", data=b"x"),
    member("/tmp/mvtec-test-absolute.txt", data=b"x"),
    member("alpha/train/good/passwd.png", tarfile.SYMTYPE, "/etc/passwd"),
    member("alpha/train/good/up.png", tarfile.SYMTYPE, "../../../../outside.txt"),
    member("alpha/train/good/hard.png", tarfile.LNKTYPE, "../outside.txt"),
    member("alpha/train/good/other.png", tarfile.SYMTYPE, "../../../beta/train/good/000.png"),
    member("alpha/train/good/dev", tarfile.CHRTYPE),
], ids=["dotdot", "absolute", "symlink-absolute", "symlink-up", "hardlink-up", "symlink-other-category", "device"])
def test_unsafe_members_are_refused_and_nothing_is_extracted(tmp_path, bad):
    archive = make_archive(tmp_path, extra_members=[bad])  # appended after the good members on purpose
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="unsafe archive member") as error:
        prepare(root, ["alpha"], archive=archive, sha256=sha256_of(archive))
    assert bad[0].name in str(error.value)
    assert not any(root.iterdir())
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside.txt").exists()
    assert not Path("/tmp/mvtec-test-absolute.txt").exists()


def test_links_inside_a_category_are_kept(tmp_path):
    link = member("alpha/train/good/link.png", tarfile.SYMTYPE, "000.png")
    archive = make_archive(tmp_path, extra_members=[link])
    root = prepare(tmp_path / "data", ["alpha"], archive=archive, sha256=sha256_of(archive))
    assert (root / "alpha" / "train" / "good" / "link.png").resolve() == root / "alpha" / "train" / "good" / "000.png"


def test_a_category_missing_from_the_archive_is_an_error(tmp_path):
    archive = make_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="holds no category folder zipper"):
        prepare(root, ["alpha", "zipper"], archive=archive, sha256=sha256_of(archive))
    assert not any(root.iterdir())


def test_offline_fails_at_once_with_the_hand_placement_hint(tmp_path):
    started = time.monotonic()
    with pytest.raises(DatasetError) as error:
        prepare(tmp_path / "data", ["alpha"], archive="http://127.0.0.1:9/mvtec_anomaly_detection.tar.xz")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message
    assert "--archive /path/to/mvtec_anomaly_detection.tar.xz" in message


class RangeHandler(BaseHTTPRequestHandler):
    """Serves one file and honours ``Range: bytes=N-``; records every Range header it receives."""

    payload = b""
    ranges: list = []

    def do_GET(self):
        requested = self.headers.get("Range")
        self.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").removesuffix("-")) if requested else 0
        if start >= len(self.payload):
            self.send_response(416)
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if requested else 200)
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def serve():
    """Serve bytes at a local URL; yields a function ``serve(payload) -> (url, list of Range headers seen)``."""
    servers = []

    def start(payload: bytes):
        handler = type("Handler", (RangeHandler,), {"payload": payload, "ranges": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/mvtec_anomaly_detection.tar.xz", handler.ranges

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_resumes_a_partial_file(tmp_path, serve):
    archive = make_archive(tmp_path)
    payload = archive.read_bytes()
    url, ranges = serve(payload)
    root = tmp_path / "data"
    root.mkdir()
    (root / "mvtec_anomaly_detection.tar.xz.part").write_bytes(payload[:len(payload) // 2])
    prepare(root, ["beta"], archive=url, sha256=sha256_of(archive))
    assert ranges == [f"bytes={len(payload) // 2}-"]
    assert sha256_of(root / "mvtec_anomaly_detection.tar.xz") == sha256_of(archive)
    assert not (root / "mvtec_anomaly_detection.tar.xz.part").exists()
    assert list_categories(root) == ["beta"]


def test_complete_part_file_is_not_downloaded_again(tmp_path, serve):
    archive = make_archive(tmp_path)
    url, ranges = serve(archive.read_bytes())
    root = tmp_path / "data"
    root.mkdir()
    (root / "mvtec_anomaly_detection.tar.xz.part").write_bytes(archive.read_bytes())
    prepare(root, ["beta"], archive=url, sha256=sha256_of(archive))
    assert ranges == [f"bytes={archive.stat().st_size}-"]  # answered 416: nothing left to fetch
    assert list_categories(root) == ["beta"]


def test_downloaded_file_with_wrong_checksum_is_set_aside(tmp_path, serve):
    archive = make_archive(tmp_path)
    url, ranges = serve(archive.read_bytes())
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="checksum mismatch.*mvtec_anomaly_detection.tar.xz.bad"):
        prepare(root, ["alpha"], archive=url, sha256="0" * 64)
    assert ranges == [None]
    assert sorted(p.name for p in root.iterdir()) == ["mvtec_anomaly_detection.tar.xz.bad"]


def test_command_line_runs_as_a_module(tmp_path):
    archive = make_archive(tmp_path)
    root = tmp_path / "data"
    command = [sys.executable, "-m", "data_prep.mvtec", "--root", str(root), "--categories", "beta",
               "--archive", str(archive), "--sha256", sha256_of(archive)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list_categories(root) == ["beta"]

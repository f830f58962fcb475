"""Tests of the HRF download against a local HTTP server on 127.0.0.1; nothing leaves the host."""

import io
import os
import re
import socket
import stat
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from retina.data import download
from retina.data.download import HRF_URL, fetch_hrf, safe_extract
from retina.data.layouts import detect_layout, find_cases
from retina.errors import DownloadError


@dataclass
class Route:
    """What the server answers for one path."""

    body: bytes
    status: int = 200
    # Declared Content-Length; larger than the body to cut the connection mid-body, None to
    # send no length and end the body by closing the connection.
    length: int | None = -1
    hang: bool = False  # wait (for the test to end) instead of answering


@dataclass
class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1 with per-path answers and a log of requests."""

    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes, **answer: object) -> str:
        self.routes[path] = Route(body, **answer)  # type: ignore[arg-type]
        return self.url(path)


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            if route.hang:
                state.release.wait(timeout=5)
                return
            self.send_response(route.status)
            self.send_header("Content-Type", "application/zip")
            if route.length is not None:
                declared = len(route.body) if route.length == -1 else route.length
                self.send_header("Content-Length", str(declared))
            self.end_headers()
            self.wfile.write(route.body)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every request on 127.0.0.1 and every cache in tmp_path, even a forgotten one."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("RETINA_HRF_URL", f"http://127.0.0.1:{_closed_port()}/unset.zip")
    monkeypatch.setenv("RETINA_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def server() -> Iterator[FakeServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = FakeServer(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(state)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_bytes(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _hrf_files() -> dict[str, bytes]:
    """A tiny HRF dataset: two photos, their vessel labels and field-of-view masks."""
    rng = np.random.default_rng(0)
    files = {}
    for stem in ("01_h", "02_g"):
        photo = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
        label = Image.fromarray(np.where(rng.random((24, 32)) > 0.8, 255, 0).astype(np.uint8))
        mask = Image.new("RGB", (32, 24), (255, 255, 255))
        files[f"images/{stem}.jpg"] = _image_bytes(photo, "JPEG")
        files[f"manual1/{stem}.tif"] = _image_bytes(label.convert("L"), "TIFF")
        files[f"mask/{stem}_mask.tif"] = _image_bytes(mask, "TIFF")
    return files


def _zip(files: dict[str, bytes], prefix: str = "", stored: bool = False) -> bytes:
    buffer = io.BytesIO()
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
    return buffer.getvalue()


def _zip_entry(info: zipfile.ZipInfo, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("images/01_h.jpg", b"not checked")
        archive.writestr(info, data)
    return buffer.getvalue()


def _leftovers(cache: Path) -> list[str]:
    """Download and unpacking debris in the cache: partial files, archives, staging folders."""
    hrf = cache / "hrf"
    if not hrf.exists():
        return []
    return sorted(
        path.name
        for path in hrf.iterdir()
        if path.suffix in {".partial", ".zip"} or path.name.startswith(".extract-")
    )


def _assert_hrf(root: Path, cache: Path) -> None:
    assert root == cache / "hrf" / "dataset"
    assert detect_layout(root) == "hrf"
    _, cases = find_cases(root)
    assert [case.name for case in cases] == ["01_h", "02_g"]
    assert all(case.mask is not None for case in cases)
    assert (cache / "hrf" / ".complete").is_file()
    assert _leftovers(cache) == []


def test_download_extracts_hrf_and_second_call_stays_offline(
    server: FakeServer, tmp_path: Path
) -> None:
    url = server.serve("/all.zip", _zip(_hrf_files()))
    cache = tmp_path / "cache"

    root = fetch_hrf(cache, url=url, show_progress=False)

    _assert_hrf(root, cache)
    assert server.requests == ["/all.zip"]
    assert fetch_hrf(cache, url=url, show_progress=False) == root
    assert server.requests == ["/all.zip"]


def test_archive_nested_in_one_top_folder(server: FakeServer, tmp_path: Path) -> None:
    url = server.serve("/all.zip", _zip(_hrf_files(), prefix="all/"))
    cache = tmp_path / "cache"

    _assert_hrf(fetch_hrf(cache, url=url, show_progress=False), cache)


@pytest.mark.parametrize("send_length", [True, False], ids=["with-length", "without-length"])
def test_progress_bar_path(server: FakeServer, tmp_path: Path, send_length: bool) -> None:
    body = _zip(_hrf_files())
    url = server.serve("/all.zip", body, length=-1 if send_length else None)
    cache = tmp_path / "cache"

    _assert_hrf(fetch_hrf(cache, url=url, show_progress=True), cache)


def test_connection_closed_mid_body_leaves_nothing_and_retry_succeeds(
    server: FakeServer, tmp_path: Path
) -> None:
    body = _zip(_hrf_files())
    url = server.serve("/all.zip", body[: len(body) // 2], length=len(body))
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match="could not download") as caught:
        fetch_hrf(cache, url=url, show_progress=False)
    assert url in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _leftovers(cache) == []
    assert not (cache / "hrf" / "dataset").exists()

    server.serve("/all.zip", body)
    _assert_hrf(fetch_hrf(cache, url=url, show_progress=False), cache)


def test_keyboard_interrupt_mid_download_leaves_nothing(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.serve("/all.zip", _zip(_hrf_files()))
    cache = tmp_path / "cache"
    real_iter_content = requests.Response.iter_content

    def interrupted(self: requests.Response, *args: object, **kwargs: object) -> Iterator[bytes]:
        chunks = real_iter_content(self, *args, **kwargs)  # type: ignore[arg-type]
        yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(requests.Response, "iter_content", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_hrf(cache, url=url, show_progress=True)
    assert _leftovers(cache) == []

    monkeypatch.setattr(requests.Response, "iter_content", real_iter_content)
    _assert_hrf(fetch_hrf(cache, url=url, show_progress=False), cache)


def test_leftovers_of_a_killed_fetch_are_cleared(server: FakeServer, tmp_path: Path) -> None:
    url = server.serve("/all.zip", _zip(_hrf_files()))
    cache = tmp_path / "cache"
    hrf = cache / "hrf"
    (hrf / ".extract-stale" / "images").mkdir(parents=True)
    (hrf / "dataset" / "images").mkdir(parents=True)
    (hrf / "hrf.zip.partial").write_bytes(b"half an archive")
    (hrf / "hrf.zip").write_bytes(b"an archive never unpacked")

    _assert_hrf(fetch_hrf(cache, url=url, show_progress=False), cache)
    assert server.requests == ["/all.zip"]


def test_dataset_removed_after_marker_is_fetched_again(server: FakeServer, tmp_path: Path) -> None:
    url = server.serve("/all.zip", _zip(_hrf_files()))
    cache = tmp_path / "cache"
    root = fetch_hrf(cache, url=url, show_progress=False)
    for path in (root / "manual1").iterdir():
        path.unlink()
    (root / "manual1").rmdir()

    _assert_hrf(fetch_hrf(cache, url=url, show_progress=False), cache)
    assert server.requests == ["/all.zip", "/all.zip"]


def test_http_404_names_the_url(server: FakeServer, tmp_path: Path) -> None:
    url = server.url("/missing.zip")
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match="404") as caught:
        fetch_hrf(cache, url=url, show_progress=False)
    assert str(caught.value) == f"could not download {url}: HTTP 404 Not Found"
    assert _leftovers(cache) == []


def test_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/all.zip"

    with pytest.raises(DownloadError, match="connection failed") as caught:
        fetch_hrf(tmp_path / "cache", url=url, show_progress=False)
    assert url in str(caught.value)
    assert "\n" not in str(caught.value)
    assert _leftovers(tmp_path / "cache") == []


def test_server_that_never_answers_times_out(server: FakeServer, tmp_path: Path) -> None:
    url = server.serve("/all.zip", b"", hang=True)

    with pytest.raises(DownloadError, match=r"no answer within 0\.3 s"):
        fetch_hrf(tmp_path / "cache", url=url, show_progress=False, timeout=0.3)
    assert _leftovers(tmp_path / "cache") == []


def test_environment_variables_choose_url_and_cache(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.serve("/mirror/hrf.zip", _zip(_hrf_files()))
    monkeypatch.setenv("RETINA_HRF_URL", url)
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("RETINA_CACHE_DIR", str(cache))

    _assert_hrf(fetch_hrf(show_progress=False), cache)
    assert server.requests == ["/mirror/hrf.zip"]
    assert (cache / "hrf" / ".complete").read_text().strip() == url


def test_default_url_is_the_published_archive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETINA_HRF_URL")
    assert download.hrf_url() == HRF_URL
    assert HRF_URL.startswith("https://www5.cs.fau.de/")


def test_archive_without_hrf_layout_is_refused(server: FakeServer, tmp_path: Path) -> None:
    files = {name: data for name, data in _hrf_files().items() if name.startswith("images/")}
    url = server.serve("/all.zip", _zip(files))
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match="does not hold the HRF layout"):
        fetch_hrf(cache, url=url, show_progress=False)
    assert _leftovers(cache) == []
    assert not (cache / "hrf" / "dataset").exists()
    assert not (cache / "hrf" / ".complete").exists()


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "images/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt"],
)
def test_entry_escaping_the_target_is_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_entry(zipfile.ZipInfo(name), b"evil"))
    target = tmp_path / "work" / "target"

    with pytest.raises(DownloadError, match="refused entry") as caught:
        safe_extract(archive, target)
    assert repr(name) in str(caught.value)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "work" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("images/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "link.zip"
    archive.write_bytes(_zip_entry(link, b"/etc/passwd"))
    target = tmp_path / "target"

    with pytest.raises(DownloadError, match="symbolic link") as caught:
        safe_extract(archive, target)
    assert "'images/link.jpg'" in str(caught.value)
    assert list(target.iterdir()) == []


def test_unsafe_archive_from_the_server_is_refused_and_removed(
    server: FakeServer, tmp_path: Path
) -> None:
    files = {**_hrf_files(), "../evil.txt": b"evil"}
    url = server.serve("/all.zip", _zip(files))
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match=re.escape("'../evil.txt'")):
        fetch_hrf(cache, url=url, show_progress=False)
    assert _leftovers(cache) == []
    assert not (cache / "evil.txt").exists()
    assert not (cache / "hrf" / "dataset").exists()


def test_random_bytes_are_refused_and_removed(server: FakeServer, tmp_path: Path) -> None:
    url = server.serve("/all.zip", np.random.default_rng(1).bytes(4096))
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match="corrupt zip archive") as caught:
        fetch_hrf(cache, url=url, show_progress=False)
    assert "hrf.zip" in str(caught.value)
    assert _leftovers(cache) == []


def test_crc_failure_is_refused_and_removed(server: FakeServer, tmp_path: Path) -> None:
    files = _hrf_files()
    body = bytearray(_zip(files, stored=True))
    photo = files["images/01_h.jpg"]
    start = bytes(body).index(photo)
    body[start + len(photo) // 2] ^= 0xFF
    url = server.serve("/all.zip", bytes(body))
    cache = tmp_path / "cache"

    with pytest.raises(DownloadError, match=re.escape("'images/01_h.jpg' fails its CRC")):
        fetch_hrf(cache, url=url, show_progress=False)
    assert _leftovers(cache) == []
    assert not (cache / "hrf" / "dataset").exists()


def test_safe_extract_unpacks_a_good_archive(tmp_path: Path) -> None:
    archive = tmp_path / "good.zip"
    files = _hrf_files()
    archive.write_bytes(_zip(files))
    target = tmp_path / "target"

    safe_extract(archive, target)

    assert archive.exists()
    for name, data in files.items():
        assert (target / name).read_bytes() == data
    assert sorted(os.listdir(target)) == ["images", "manual1", "mask"]

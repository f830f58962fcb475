"""Download and unpack the HRF fundus dataset when the user gives no data folder.

The archive (about 50 MB) is streamed to ``<cache>/hrf/hrf.zip.partial`` and renamed to
``hrf.zip`` only once every byte has arrived. It is unpacked into a temporary folder, checked
entry by entry so that nothing lands outside it, and the folder holding ``images/`` and
``manual1/`` is renamed to ``<cache>/hrf/dataset``. The marker ``.complete`` is written last:
while it is present, later calls return the folder at once without touching the network, and
while it is absent, a call starts again from scratch.

One process at a time is expected to fetch into a given cache folder.
"""

import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import requests
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from retina.data.dataset import default_cache_dir
from retina.data.layouts import detect_layout
from retina.errors import DataError, DownloadError

log = logging.getLogger(__name__)

HRF_URL = "https://www5.cs.fau.de/fileadmin/research/datasets/fundus-images/all.zip"

ARCHIVE_NAME = "hrf.zip"
PARTIAL_SUFFIX = ".partial"
ROOT_NAME = "dataset"
MARKER_NAME = ".complete"
EXTRACT_PREFIX = ".extract-"

_CHUNK_BYTES = 1 << 16
_MAX_REASON_CHARS = 200


def hrf_url() -> str:
    """The HRF archive address: ``RETINA_HRF_URL`` when set, so mirrors and tests can swap it."""
    return os.environ.get("RETINA_HRF_URL") or HRF_URL


def fetch_hrf(
    cache_dir: Path | None = None,
    url: str | None = None,
    show_progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Return the HRF dataset folder under ``<cache>/hrf/``, downloading it the first time.

    ``timeout`` bounds, in seconds, the wait to connect and each wait for more data.
    Raises DownloadError when the archive cannot be fetched or is refused; nothing partial
    is left behind, so the next call starts cleanly.
    """
    base = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "hrf"
    root = base / ROOT_NAME
    marker = base / MARKER_NAME
    if marker.is_file() and _holds_hrf(root):
        log.debug("HRF dataset already in %s", root)
        return root

    url = url or hrf_url()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"could not create cache folder {base}: {_one_line(error)}") from error
    _remove_leftovers(base)

    archive = base / ARCHIVE_NAME
    try:
        log.info("downloading the HRF dataset from %s", url)
        _download(url, archive, show_progress=show_progress, timeout=timeout)
        _install(archive, base, url)
    finally:
        archive.unlink(missing_ok=True)
    log.info("HRF dataset ready in %s", root)
    return root


def safe_extract(archive: Path, target: Path) -> None:
    """Unpack a zip archive into ``target``, refusing it whole if it is corrupt or unsafe.

    Every entry is checked before anything is written: an absolute name, a ``..`` part, a
    name that resolves outside ``target`` or a symbolic link raises DownloadError naming the
    entry, and so does a damaged archive (bad structure or failed CRC check). The archive
    itself is left in place.
    """
    target.mkdir(parents=True, exist_ok=True)
    target_root = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zip_file:
            entries = zip_file.infolist()
            for entry in entries:
                _check_entry(entry, target_root, archive)
            damaged = zip_file.testzip()
            if damaged is not None:
                raise DownloadError(f"{archive}: corrupt archive, entry {damaged!r} fails its CRC")
            for entry in entries:
                zip_file.extract(entry, target_root)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DownloadError(f"{archive}: corrupt zip archive ({_one_line(error)})") from error
    except NotImplementedError as error:
        raise DownloadError(f"{archive}: unsupported zip archive ({_one_line(error)})") from error


def _holds_hrf(folder: Path) -> bool:
    try:
        return detect_layout(folder) == "hrf"
    except DataError:
        return False


def _remove_leftovers(base: Path) -> None:
    """Clear what an interrupted or refused earlier fetch may have left, so we start clean."""
    (base / MARKER_NAME).unlink(missing_ok=True)
    (base / (MARKER_NAME + PARTIAL_SUFFIX)).unlink(missing_ok=True)
    (base / (ARCHIVE_NAME + PARTIAL_SUFFIX)).unlink(missing_ok=True)
    (base / ARCHIVE_NAME).unlink(missing_ok=True)
    for folder in [base / ROOT_NAME, *base.glob(EXTRACT_PREFIX + "*")]:
        if folder.is_dir() and not folder.is_symlink():
            log.debug("removing leftover %s", folder)
            shutil.rmtree(folder)
        elif folder.exists() or folder.is_symlink():
            folder.unlink()


@contextmanager
def _progress_bar(show: bool, total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """Yield a function that advances a rich download bar on stderr, or does nothing."""
    if not show:
        yield lambda _count: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda count: progress.advance(task, count)


def _declared_length(response: requests.Response) -> int | None:
    """Content-Length as a byte count, or None when absent, unusable or for encoded bodies."""
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None  # requests decodes the body, so the byte counts would not compare.
    try:
        length = int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None
    return length if length >= 0 else None


def _download(url: str, archive: Path, show_progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``archive``, which appears only once the whole body has arrived."""
    partial = archive.with_name(archive.name + PARTIAL_SUFFIX)
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = _declared_length(response)
            received = 0
            with (
                partial.open("wb") as out,
                _progress_bar(show_progress, total, "HRF dataset") as advance,
            ):
                for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    advance(len(chunk))
        if total is not None and received != total:
            raise DownloadError(
                f"could not download {url}: got {received} of {total} bytes before the "
                "connection ended"
            )
        partial.replace(archive)
        log.info("downloaded %d bytes from %s", received, url)
    except requests.RequestException as error:
        reason = _request_failure(error, timeout)
        raise DownloadError(f"could not download {url}: {reason}") from error
    except OSError as error:
        raise DownloadError(f"could not write {partial}: {_one_line(error)}") from error
    finally:
        partial.unlink(missing_ok=True)


def _request_failure(error: requests.RequestException, timeout: float) -> str:
    """A short, one-line reason for a failed request, without urllib3's nested reprs."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        response = error.response
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the connection ended before the whole file arrived"
    if isinstance(error, requests.ConnectionError):
        cause = _os_error_in(error)
        if cause is not None and cause.strerror:
            return f"connection failed ({cause.strerror})"
        return "connection failed"
    return _one_line(error)


def _os_error_in(error: BaseException) -> OSError | None:
    """The innermost low-level OSError (refused, unreachable, unknown host) behind an error."""
    found = None
    pending: list[object] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current).__module__ in {"builtins", "socket"} and isinstance(current, OSError):
            found = current
        pending += [*current.args, getattr(current, "reason", None)]
        pending += [current.__cause__, current.__context__]
    return found


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _check_entry(entry: zipfile.ZipInfo, target_root: Path, archive: Path) -> None:
    """Refuse an entry that could write outside ``target_root`` or create a link."""
    name = entry.filename
    if PurePosixPath(name).is_absolute() or name.startswith("\\") or PureWindowsPath(name).drive:
        raise DownloadError(f"{archive}: refused entry {name!r} with an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise DownloadError(f"{archive}: refused entry {name!r} that climbs out with '..'")
    if not (target_root / name).resolve().is_relative_to(target_root):
        raise DownloadError(f"{archive}: refused entry {name!r} that lands outside the target")
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise DownloadError(f"{archive}: refused entry {name!r} that is a symbolic link")


def _find_hrf_root(folder: Path) -> Path | None:
    """The unpacked folder itself or its single subfolder, whichever has the HRF layout."""
    if _holds_hrf(folder):
        return folder
    subfolders = [
        path
        for path in folder.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"
    ]
    if len(subfolders) == 1 and _holds_hrf(subfolders[0]):
        return subfolders[0]
    return None


def _install(archive: Path, base: Path, url: str) -> None:
    """Unpack ``archive`` beside it, move the HRF folder into place and mark it complete."""
    staging = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=base))
    try:
        safe_extract(archive, staging)
        found = _find_hrf_root(staging)
        if found is None:
            raise DownloadError(
                f"{url}: the archive does not hold the HRF layout (images/ and manual1/)"
            )
        found.rename(base / ROOT_NAME)
        pending_marker = base / (MARKER_NAME + PARTIAL_SUFFIX)
        pending_marker.write_text(f"{url}\n")
        pending_marker.replace(base / MARKER_NAME)
    except OSError as error:
        raise DownloadError(f"could not unpack {archive}: {_one_line(error)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)

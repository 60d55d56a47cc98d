"""Streamed, resumable, verified download of one file (stdlib ``urllib`` only).

``download(url, out, ...)`` writes into ``<out>.part`` and renames it onto ``out`` only after the size and
checksums match, so a file under its final name is always whole and verified. An interrupted transfer
(dropped connection, Ctrl-C, crash) leaves ``<out>.part``; the next attempt, or the next run, asks for the
rest with ``Range: bytes=N-``. A server that ignores the Range header (answers 200) is read from the start.

Transient failures (connection errors, short bodies, HTTP 5xx, 408, 429) are retried with exponential
back-off; a permanent one (other 4xx, e.g. 404) moves on to the next mirror at once. A source that is a
local path (or ``file://`` URL) is verified where it lies and returned, never copied.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from negmargin import __version__
from negmargin.errors import UserError
from negmargin.options import SourceConfig
from negmargin.runtime import Progress

CHUNK = 1 << 20
USER_AGENT = f"negmargin/{__version__} (+urllib)"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Digests:
    """What a verified file measured: its size and both checksums."""

    size: int
    md5: str
    sha256: str


def is_url(source: str | os.PathLike) -> bool:
    """True for http(s)/ftp URLs; False for local paths and ``file://`` URLs."""
    return urllib.parse.urlparse(str(source)).scheme.lower() in ("http", "https", "ftp")


def local_path(source: str | os.PathLike) -> Path:
    """The path of a local source (a plain path or a ``file://`` URL)."""
    text = str(source)
    if text.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path))
    return Path(text).expanduser()


def url_filename(url: str) -> str:
    """The file name a URL points at (``.../CUB_200_2011.tgz?download=1`` -> ``CUB_200_2011.tgz``)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "download"


# ----------------------------------------------------------------------------------------------- verify


def file_digests(path: str | os.PathLike, label: str | None = None, interval: float = 30.0) -> Digests:
    """Size, md5 and sha256 of a file in one pass (with progress lines for big files)."""
    path = Path(path)
    total = path.stat().st_size
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    progress = (
        Progress(label or f"checksum {path.name}", total, interval=interval) if total > 1 << 30 else None
    )
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK * 4):
            md5.update(block)
            sha256.update(block)
            if progress is not None:
                progress.update(len(block))
    if progress is not None:
        progress.close()
    return Digests(total, md5.hexdigest(), sha256.hexdigest())


def check_digests(
    what: str, actual: Digests, md5: str | None = None, sha256: str | None = None, size: int | None = None,
    sha256_prefix: str | None = None,
) -> None:
    """Raise UserError naming ``what`` with expected and actual values if anything differs.
    ``sha256_prefix``: the first hex digits of the sha256 (all a publisher states, e.g. OpenMMLab's 8 in a
    file name)."""
    problems = []
    if size is not None and int(size) != actual.size:
        problems.append(f"size is {actual.size} bytes, expected {int(size)}")
    if md5 and md5.lower() != actual.md5:
        problems.append(f"md5 is {actual.md5}, expected {md5.lower()}")
    if sha256 and sha256.lower() != actual.sha256:
        problems.append(f"sha256 is {actual.sha256}, expected {sha256.lower()}")
    if sha256_prefix and not actual.sha256.startswith(sha256_prefix.lower()):
        problems.append(f"sha256 is {actual.sha256[:len(sha256_prefix)]}..., expected it to start with "
                        f"{sha256_prefix.lower()}")
    if problems:
        raise UserError(f"{what}: {'; '.join(problems)}")


def verify_file(
    path: str | os.PathLike, md5: str | None = None, sha256: str | None = None, size: int | None = None,
    sha256_prefix: str | None = None,
) -> Digests:
    """Check a local file against the given size/checksums; returns what was measured."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if size is not None and path.stat().st_size != int(size):
        # Cheap check first: no need to hash 100 GB to learn that the size is wrong.
        raise UserError(f"{path}: size is {path.stat().st_size} bytes, expected {int(size)}")
    digests = file_digests(path)
    check_digests(str(path), digests, md5, sha256, size, sha256_prefix)
    return digests


# ----------------------------------------------------------------------------------------------- download


class DownloadFailed(UserError):
    """Every source failed; ``out`` is where the verified file would have gone (a file put there by hand and
    verifying is used by the next run)."""

    def __init__(self, message: str, out: Path) -> None:
        super().__init__(message)
        self.out = out


class _Transient(Exception):
    """A failure worth retrying on the same source (connection dropped, 5xx, short body)."""


class _Permanent(Exception):
    """A failure that retrying the same source will not fix (404, 403, wrong content)."""


def _validate_checksum_args(md5: str | None, sha256: str | None, sha256_prefix: str | None = None) -> None:
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise UserError(f"md5 must be 32 hex digits, got {md5!r}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if sha256_prefix is not None and not re.fullmatch(r"[0-9a-fA-F]{4,64}", sha256_prefix):
        raise UserError(f"sha256 prefix must be 4 to 64 hex digits, got {sha256_prefix!r}")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https/ftp only)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise  # handled by the caller: the .part file may already be complete
        message = f"HTTP {exc.code} {exc.reason}"
        if exc.code in RETRYABLE_STATUS:
            raise _Transient(message) from None
        raise _Permanent(message) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Transient(f"connection failed ({reason})") from None


def _transfer_once(url: str, part: Path, progress: Progress, size: int | None, timeout: float) -> None:
    """One request: append to ``part`` from its current length; raises unless the body arrived whole."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError:  # 416: nothing left to send from this offset
        if size is None or offset == size:
            return
        part.unlink()
        raise _Transient(f"HTTP 416 for a {offset}-byte partial file; starting again") from None
    with response:
        status = response.status
        expected: int | None = None
        if status == 206 and offset:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise _Transient(
                    f"bad Content-Range {response.headers.get('Content-Range')!r} for offset {offset}"
                )
            if match.group(3) != "*":
                expected = int(match.group(3))
        else:
            # 200: the server sends the whole file (it ignored Range, or there was none): start over.
            if offset:
                print(
                    f"{url}: server ignored the Range request; downloading from the start",
                    file=sys.stderr,
                    flush=True,
                )
            offset = 0
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
        if size is not None and expected is not None and expected != size:
            raise _Permanent(f"server announces {expected} bytes, expected {size}")
        mode = "ab" if offset else "wb"
        progress.reset(offset, expected if expected is not None else size)
        received = offset
        with open(part, mode) as handle:
            while True:
                try:
                    block = response.read1(CHUNK)  # what has arrived: a stall keeps the bytes before it
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(f"connection dropped after {received} bytes ({exc})") from None
                if not block:
                    break
                handle.write(block)
                received += len(block)
                progress.update(len(block))
                if size is not None and received > size:
                    handle.close()
                    part.unlink()
                    raise _Permanent(f"server sent more than the expected {size} bytes")
        if expected is not None and received < expected:
            raise _Transient(f"connection dropped after {received} of {expected} bytes")


def _download_from(
    url: str, part: Path, progress: Progress, size: int | None, retries: int, backoff: float, timeout: float
) -> None:
    """Fetch ``url`` into ``part``, resuming and retrying transient failures."""
    attempt = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer_once(url, part, progress, size, timeout)
            return
        except _Transient as exc:
            after = part.stat().st_size if part.exists() else 0
            # A request that made progress does not count against the retry budget, and is resumed at
            # once: a flaky link that drops every few GB still finishes. Only failures without progress
            # back off (backoff, 2*backoff, 4*backoff, ... at most 60 s).
            attempt = 0 if after > before else attempt + 1
            if attempt > retries:
                raise _Transient(f"{exc} (gave up after {retries + 1} attempts)") from None
            delay = min(backoff * 2 ** (attempt - 1), 60.0) if attempt else 0.0
            resuming = f" (resuming at {after} bytes)" if after else ""
            print(f"{url}: {exc}; retrying in {delay:.1f}s{resuming}", file=sys.stderr, flush=True)
            time.sleep(delay)


def _download(
    url: str,
    out: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    mirrors: Sequence[str] = (),
    retries: int = SourceConfig.retries,
    backoff: float = SourceConfig.backoff,
    timeout: float = SourceConfig.timeout,
    progress_interval: float = 30.0,
    sha256_prefix: str | None = None,
) -> tuple[Path, Digests]:
    """As :func:`download`, also returning the measured digests."""
    _validate_checksum_args(md5, sha256, sha256_prefix)
    if size is not None and int(size) < 0:
        raise UserError(f"size must be >= 0, got {size}")
    size = int(size) if size is not None else None
    if not is_url(url):
        path = local_path(url)
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        return path, verify_file(path, md5, sha256, size, sha256_prefix)

    out = Path(out)
    aside = set_aside_path(out)
    if aside.is_file() and not out.exists():  # a run killed while the file was aside: put it back first
        os.replace(aside, out)
    if out.is_file():
        try:
            return out, verify_file(out, md5, sha256, size, sha256_prefix)
        except UserError as exc:
            # Maybe a file the user put there by hand: kept aside, not deleted, until a new one verifies.
            os.replace(out, aside)
            print(f"{out}: existing file does not verify ({exc}); moved to {aside.name} while a new copy "
                  "downloads, and put back if that fails", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        digests = _download_sources(url, out, md5, sha256, size, mirrors, retries, backoff, timeout,
                                    progress_interval, sha256_prefix)
    except BaseException:
        if aside.is_file() and not out.exists():
            os.replace(aside, out)
            print(f"{out}: the earlier file is back in place, unchanged", file=sys.stderr, flush=True)
        raise
    aside.unlink(missing_ok=True)
    return out, digests


def set_aside_path(out: Path) -> Path:
    """Where an existing ``out`` that does not verify waits while a new copy downloads."""
    return out.with_name(out.name + ".unverified")


def _download_sources(
    url: str,
    out: Path,
    md5: str | None,
    sha256: str | None,
    size: int | None,
    mirrors: Sequence[str],
    retries: int,
    backoff: float,
    timeout: float,
    progress_interval: float,
    sha256_prefix: str | None = None,
) -> Digests:
    """Fetch ``url`` (then each mirror) into ``<out>.part`` and rename it onto ``out`` once it verifies."""
    part = out.with_name(out.name + ".part")
    failures: list[str] = []
    for source in (url, *mirrors):
        if not is_url(source):
            failures.append(f"{source}: not an http(s)/ftp URL")
            continue
        progress = Progress(f"download {out.name}", size, interval=progress_interval)
        try:
            _download_from(source, part, progress, size, retries, backoff, timeout)
        except (_Transient, _Permanent) as exc:
            progress.close(final=False)
            failures.append(f"{source}: {exc}")
            continue
        except BaseException:
            progress.close(final=False)
            raise  # Ctrl-C and friends: keep the .part file for a later resume
        progress.close()
        digests = file_digests(part, label=f"checksum {out.name}")
        try:
            check_digests(f"download of {source}", digests, md5, sha256, size, sha256_prefix)
        except UserError as exc:
            part.unlink(missing_ok=True)
            failures.append(str(exc))
            continue
        os.replace(part, out)
        return digests

    raise DownloadFailed(
        "; ".join(failures)
        if len(failures) == 1
        else f"download of {out.name} failed from every source: " + "; ".join(failures),
        out,
    )


def download(
    url: str,
    out: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    mirrors: Sequence[str] = (),
    retries: int = SourceConfig.retries,
    backoff: float = SourceConfig.backoff,
    timeout: float = SourceConfig.timeout,
    progress_interval: float = 30.0,
    sha256_prefix: str | None = None,
) -> Path:
    """Download ``url`` to ``out``, verified; returns the path of the verified file.

    * ``md5`` / ``sha256`` / ``sha256_prefix`` / ``size``: checked before the file gets its final name; on a
      mismatch the partial file is deleted and the next mirror is tried, and if none is left a UserError
      gives the expected and actual values. ``sha256_prefix``: the leading hex digits of the sha256, where
      that is all the publisher states (OpenMMLab's 8 in a released file name).
    * ``mirrors``: tried in order after ``url`` when it fails for good.
    * ``retries``: further attempts per source after a transient failure, waiting ``backoff * 2**(k-1)``
      seconds (at most 60) before the k-th retry. An attempt that received bytes does not count and is
      resumed at once.
    * If ``out`` already exists and verifies, nothing is downloaded. If it does not verify, it is moved to
      ``<out>.unverified`` (not deleted: it may be a file put there by hand), put back unchanged if the
      download fails, and deleted once the new file has verified.
    * If ``url`` is a local path (or ``file://``), that file is verified and its path returned; ``out``
      is not written.
    """
    path, _ = _download(
        url,
        out,
        md5=md5,
        sha256=sha256,
        size=size,
        mirrors=mirrors,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        progress_interval=progress_interval,
        sha256_prefix=sha256_prefix,
    )
    return path


def fetch_source(
    source: str | os.PathLike,
    raw_dir: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    mirrors: Sequence[str] = (),
    retries: int = SourceConfig.retries,
    backoff: float = SourceConfig.backoff,
    timeout: float = SourceConfig.timeout,
) -> tuple[Path, Digests | None]:
    """Resolve a dataset source to a local path: a URL is downloaded into ``raw_dir`` first.

    Files are verified (and their digests returned); a local folder is returned as is, with no digests.
    """
    if is_url(source):
        out = Path(raw_dir) / url_filename(str(source))
        return _download(
            str(source),
            out,
            md5=md5,
            sha256=sha256,
            size=size,
            mirrors=mirrors,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
        )
    path = local_path(source)
    if path.is_dir():
        if md5 or sha256 or size is not None:
            raise UserError(f"{path}: is a folder; --md5/--sha256/--size apply to an archive file only")
        return path, None
    if not path.exists():
        raise UserError(f"{path}: source not found")
    return path, verify_file(path, md5, sha256, size)

"""Safe extraction of tar (plain, gz, bz2, xz) and zip archives.

Every member is checked before anything is written. Rejected, with a UserError naming the archive and
the member:

* absolute names (``/etc/passwd``, ``C:\\x``) and names with a ``..`` component;
* symbolic and hard links whose target lies outside the extraction folder, and members whose path
  goes through a link (``link/../../x``);
* device files and FIFOs.

The archive is extracted into a temporary folder next to ``dest`` and renamed onto ``dest`` when
complete, so ``dest`` is either absent or whole. For tar files the standard library's ``data`` filter
runs as well, as a second line of defence (it also drops set-uid bits and ownership).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

from negmargin.errors import UserError
from negmargin.io import WRITE_ERRNOS, publish_mode, write_error

MARKER = ".negmargin-extracted.json"


def _normalise(name: str) -> str:
    return name.replace("\\", "/")


def _check_name(archive: Path, name: str) -> str:
    """The member's path relative to the root, or a UserError if it is absolute or climbs out."""
    text = _normalise(name)
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or text.startswith("//"):
        raise UserError(f"{archive}: unsafe member {name!r}: absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"{archive}: unsafe member {name!r}: '..' in path")
    return "/".join(parts)


def _check_through_links(archive: Path, name: str, relative: str, links: set[str]) -> None:
    parts = relative.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise UserError(
                f"{archive}: unsafe member {name!r}: path goes through the link {'/'.join(parts[:i])!r}"
            )


def _check_link_target(archive: Path, name: str, target: str, base_dir: str, links: set[str]) -> None:
    """``target`` as stored, resolved step by step from ``base_dir`` (the member's folder for symlinks, the
    root for hard links). Rejected if it leaves the root or passes through another link (chains of links
    can escape even when each one alone stays inside)."""
    text = _normalise(target)
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UserError(f"{archive}: unsafe member {name!r}: link to absolute path {target!r}")
    stack = [p for p in base_dir.split("/") if p]
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UserError(
                    f"{archive}: unsafe member {name!r}: link target {target!r} lies outside the archive"
                )
            stack.pop()
            continue
        stack.append(part)
        if "/".join(stack) in links:
            raise UserError(
                f"{archive}: unsafe member {name!r}: link target {target!r} goes through another link"
            )


def _tar_members(archive: Path, handle: tarfile.TarFile) -> list[tarfile.TarInfo]:
    links: set[str] = set()
    members = []
    for member in handle.getmembers():
        relative = _check_name(archive, member.name)
        if not relative:
            continue
        _check_through_links(archive, member.name, relative, links)
        if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
            raise UserError(f"{archive}: unsafe member {member.name!r}: device file or FIFO")
        if member.issym():
            _check_link_target(archive, member.name, member.linkname, posixpath.dirname(relative), links)
            links.add(relative)
        elif member.islnk():
            _check_link_target(archive, member.name, member.linkname, "", links)
        elif not (member.isfile() or member.isdir()):
            raise UserError(f"{archive}: unsafe member {member.name!r}: unsupported member type")
        members.append(member)
    return members


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _zip_members(archive: Path, handle: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    links: set[str] = set()
    members = []
    for info in handle.infolist():
        relative = _check_name(archive, info.filename)
        if not relative:
            continue
        _check_through_links(archive, info.filename, relative, links)
        mode = info.external_attr >> 16 if info.create_system == 3 else 0
        if mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
            raise UserError(f"{archive}: unsafe member {info.filename!r}: device file or FIFO")
        if _zip_is_symlink(info):
            target = handle.read(info).decode("utf-8", "surrogateescape")
            _check_link_target(archive, info.filename, target, posixpath.dirname(relative), links)
            links.add(relative)
        members.append((info, relative))
    return members


def _extract_zip(archive: Path, tmp: Path) -> None:
    with zipfile.ZipFile(archive) as handle:
        for info, relative in _zip_members(archive, handle):
            target = tmp / relative
            if _zip_is_symlink(info):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(handle.read(info).decode("utf-8", "surrogateescape"), target)
            elif info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with handle.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _extract_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive, "r:*") as handle:
        members = _tar_members(archive, handle)
        try:
            if hasattr(tarfile, "data_filter"):
                handle.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover (Python < 3.11.4); the checks above already ran
                handle.extractall(tmp, members=members)
        except tarfile.FilterError as exc:
            raise UserError(f"{archive}: unsafe member {exc.tarinfo.name!r}: {exc}") from None


def archive_kind(archive: str | os.PathLike) -> str:
    """``"zip"`` or ``"tar"`` by content (not by name); UserError otherwise."""
    archive = Path(archive)
    if not archive.is_file():
        raise UserError(f"{archive}: archive not found")
    try:
        # tar first: zipfile.is_zipfile also says yes to a tar that merely *contains* a zip near its end.
        if tarfile.is_tarfile(archive):
            return "tar"
        if zipfile.is_zipfile(archive):
            return "zip"
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise UserError(f"{archive}: corrupt or truncated archive ({exc})") from None
    raise UserError(f"{archive}: not a tar or zip archive")


def extract(archive: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Extract ``archive`` (tar, tgz, tar.bz2, tar.xz or zip) into the folder ``dest``, safely and atomically.

    ``dest`` must not exist unless ``overwrite`` is set. A marker file ``.negmargin-extracted.json``
    (archive name and size) is written inside, so :func:`extract_once` can reuse the folder.
    """
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest}: already exists; remove it or extract elsewhere")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"{archive}: corrupt or truncated archive ({exc})") from None
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:  # a full disk while extracting
                raise write_error(dest, exc) from None
            raise UserError(f"{archive}: corrupt or truncated archive ({exc})") from None
        (tmp / MARKER).write_text(
            json.dumps({"archive": archive.name, "size": archive.stat().st_size}) + "\n"
        )
        if dest.exists():
            shutil.rmtree(dest)
        publish_mode(tmp, directory=True)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extract_once(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Like :func:`extract`, but reuse ``dest`` if an earlier run extracted this same archive there."""
    archive, dest = Path(archive), Path(dest)
    marker = dest / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except json.JSONDecodeError:
            info = {}
        if info == {"archive": archive.name, "size": archive.stat().st_size}:
            return dest
    return extract(archive, dest, overwrite=True)

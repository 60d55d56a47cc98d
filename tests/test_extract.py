"""negmargin.data.extract: good archives come out whole; hostile members are refused before anything lands."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from negmargin.data.extract import MARKER, extract, extract_once
from negmargin.errors import UserError


def _tar(path: Path, members: list[tuple[str, str, object]], mode: str = "w:gz") -> Path:
    """members: (kind, name, payload) with kind file (payload bytes), dir, sym/hard (payload = target), chr, fifo."""
    with tarfile.open(path, mode) as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "hard": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            if kind in ("sym", "hard"):
                info.linkname = payload
            tar.addfile(info)
    return path


def _zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


GOOD = [
    ("dir", "top", None),
    ("file", "top/a.txt", b"alpha"),
    ("dir", "top/sub", None),
    ("file", "top/sub/b.bin", b"\x00\x01"),
    ("sym", "top/link", "sub/b.bin"),
    ("hard", "top/a2.txt", "top/a.txt"),
]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_good_tar_is_extracted(tmp_path, mode):
    archive = _tar(tmp_path / "good.tar", GOOD, mode)
    dest = extract(archive, tmp_path / "out")
    assert (dest / "top" / "a.txt").read_bytes() == b"alpha"
    assert (dest / "top" / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert os.readlink(dest / "top" / "link") == "sub/b.bin"
    assert (dest / "top" / "a2.txt").read_bytes() == b"alpha"
    assert (dest / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tar", "out"]  # no temp folder left


def test_good_zip_is_extracted(tmp_path):
    archive = _zip(
        tmp_path / "good.zip", [("images/", b""), ("images/x.jpg", b"jpeg")], {"images/y.jpg": "x.jpg"}
    )
    dest = extract(archive, tmp_path / "out")
    assert (dest / "images" / "x.jpg").read_bytes() == b"jpeg"
    assert os.readlink(dest / "images" / "y.jpg") == "x.jpg"


@pytest.mark.parametrize(
    ("members", "bad", "why"),
    [
        ([("file", "/etc/evil", b"x")], "/etc/evil", "absolute"),
        ([("file", "ok.txt", b"x"), ("file", "../evil", b"x")], "../evil", r"'\.\.'"),
        ([("file", "a/../../evil", b"x")], "a/../../evil", r"'\.\.'"),
        ([("sym", "link", "/etc")], "link", "absolute"),
        ([("sym", "d/link", "../../outside")], "d/link", "outside"),
        ([("hard", "hl", "../outside")], "hl", "outside"),
        ([("hard", "hl", "/etc/passwd")], "hl", "absolute"),
        ([("sym", "l1", "."), ("file", "l1/x", b"x")], "l1/x", "through the link"),
        ([("sym", "l1", "."), ("sym", "l2", "l1/..")], "l2", "another link"),
        ([("chr", "dev/null", None)], "dev/null", "device"),
        ([("fifo", "pipe", None)], "pipe", "device"),
    ],
)
def test_hostile_tar_members_are_rejected(tmp_path, members, bad, why):
    archive = _tar(tmp_path / "bad.tgz", members)
    with pytest.raises(UserError, match=why) as info:
        extract(archive, tmp_path / "out")
    assert str(archive) in str(info.value) and repr(bad) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tgz"]  # nothing extracted, no temp folder
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path.parent / "outside").exists()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.txt", r"'\.\.'"),
        ("/abs.txt", "absolute"),
        ("a\\..\\..\\evil.txt", r"'\.\.'"),
        ("C:/evil.txt", "absolute"),
    ],
)
def test_hostile_zip_members_are_rejected(tmp_path, name, why):
    archive = _zip(tmp_path / "bad.zip", [("fine.txt", b"x"), (name, b"x")])
    with pytest.raises(UserError, match=why) as info:
        extract(archive, tmp_path / "out")
    assert str(archive) in str(info.value) and repr(name) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_zip_symlink_outside_is_rejected(tmp_path):
    archive = _zip(tmp_path / "bad.zip", [("a.txt", b"x")], {"link": "../../etc/passwd"})
    with pytest.raises(UserError, match="outside"):
        extract(archive, tmp_path / "out")


def test_existing_destination_and_non_archives(tmp_path):
    archive = _tar(tmp_path / "good.tgz", GOOD)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        extract(archive, tmp_path / "out")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(UserError, match="not a tar or zip"):
        extract(junk, tmp_path / "out2")
    truncated = tmp_path / "cut.tgz"
    truncated.write_bytes(archive.read_bytes()[:60])
    with pytest.raises(UserError, match=str(truncated)):
        extract(truncated, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_extract_once_reuses_the_same_archive(tmp_path):
    archive = _tar(tmp_path / "good.tgz", GOOD)
    dest = extract_once(archive, tmp_path / "out")
    (dest / "top" / "a.txt").write_bytes(b"touched")
    extract_once(archive, tmp_path / "out")
    assert (dest / "top" / "a.txt").read_bytes() == b"touched"  # reused, not extracted again
    other = _tar(tmp_path / "other.tgz", [("file", "new.txt", b"n")])
    extract_once(other, tmp_path / "out")
    assert (dest / "new.txt").is_file() and not (dest / "top").exists()

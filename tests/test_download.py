"""negmargin.data.download against a real HTTP server on 127.0.0.1 that misbehaves on demand."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from http_server import FileServer, wrong_bytes

from negmargin.cli import main
from negmargin.data.download import download, fetch_source, url_filename, verify_file
from negmargin.errors import UserError
from negmargin.runtime import Progress

DATA = os.urandom(3 * 1024 * 1024 + 123)  # a few chunks, not a multiple of the chunk size
MD5 = hashlib.md5(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()
FAST = {"retries": 2, "backoff": 0.01}


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def test_normal_download_verifies_and_renames(server, tmp_path):
    url = server.add("/data.bin", DATA)
    out = tmp_path / "sub" / "data.bin"
    assert download(url, out, md5=MD5, sha256=SHA256, size=len(DATA), **FAST) == out
    assert out.read_bytes() == DATA
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert server.requests_for("/data.bin") == [None]
    # Already there and verified: no second request.
    download(url, out, md5=MD5, **FAST)
    assert len(server.requests_for("/data.bin")) == 1


def test_dropped_connection_resumes_with_range(server, tmp_path):
    url = server.add("/big.bin", DATA, mode="drop")
    out = tmp_path / "big.bin"
    download(url, out, md5=MD5, size=len(DATA), **FAST)
    assert out.read_bytes() == DATA
    ranges = server.requests_for("/big.bin")
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(DATA)  # asked only for the rest, not the whole file again
    assert resumed_at >= len(DATA) // 2 - 1024 * 1024


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    url = server.add("/data.bin", DATA)
    out = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(DATA[:1000])
    download(url, out, sha256=SHA256, **FAST)
    assert out.read_bytes() == DATA
    assert server.requests_for("/data.bin") == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    url = server.add("/data.bin", DATA, mode="norange")
    out = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"x" * 5000)  # wrong bytes: must not be kept
    download(url, out, md5=MD5, **FAST)
    assert out.read_bytes() == DATA
    assert server.requests_for("/data.bin") == ["bytes=5000-"]
    assert "ignored the Range request" in capsys.readouterr().err


def test_complete_part_file_gets_416_and_is_used(server, tmp_path):
    url = server.add("/data.bin", DATA)
    out = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(DATA)
    download(url, out, md5=MD5, size=len(DATA), **FAST)
    assert out.read_bytes() == DATA


def test_wrong_bytes_raise_with_expected_and_actual_and_leave_nothing(server, tmp_path):
    url = server.add("/data.bin", DATA, mode="wrong")
    out = tmp_path / "data.bin"
    with pytest.raises(UserError) as info:
        download(url, out, md5=MD5, **FAST)
    message = str(info.value)
    wrong_md5 = hashlib.md5(wrong_bytes(DATA)).hexdigest()
    assert f"expected {MD5}" in message and f"md5 is {wrong_md5}" in message and url in message
    assert not out.exists() and not (tmp_path / "data.bin.part").exists()
    assert os.listdir(tmp_path) == []


def test_wrong_size_raises_with_both_sizes(server, tmp_path):
    url = server.add("/data.bin", DATA)
    out = tmp_path / "data.bin"
    with pytest.raises(UserError, match=rf"{len(DATA)}.*expected {len(DATA) + 1}"):
        download(url, out, size=len(DATA) + 1, **FAST)
    assert os.listdir(tmp_path) == []


def test_404_is_not_retried(server, tmp_path):
    url = server.add("/missing.bin", DATA, mode="404")
    with pytest.raises(UserError) as info:
        download(url, tmp_path / "x.bin", retries=5, backoff=0.01)
    assert url in str(info.value) and "HTTP 404" in str(info.value)
    assert len(server.requests_for("/missing.bin")) == 1


def test_500_is_retried_then_reported(server, tmp_path):
    url = server.add("/broken.bin", DATA, mode="500")
    with pytest.raises(UserError) as info:
        download(url, tmp_path / "x.bin", retries=2, backoff=0.01)
    assert url in str(info.value) and "HTTP 500" in str(info.value) and "3 attempts" in str(info.value)
    assert len(server.requests_for("/broken.bin")) == 3


def test_mirrors_are_tried_in_order(server, tmp_path):
    bad = server.add("/gone.bin", DATA, mode="404")
    corrupt = server.add("/corrupt.bin", DATA, mode="wrong")
    good = server.add("/good.bin", DATA)
    out = tmp_path / "data.bin"
    download(bad, out, md5=MD5, mirrors=[corrupt, good], **FAST)
    assert out.read_bytes() == DATA
    assert [p for p, _ in server.requests] == ["/gone.bin", "/corrupt.bin", "/good.bin"]


def test_all_sources_failing_names_each(server, tmp_path):
    a = server.add("/a.bin", DATA, mode="404")
    b = server.add("/b.bin", DATA, mode="500")
    with pytest.raises(UserError) as info:
        download(a, tmp_path / "x.bin", mirrors=[b], **FAST)
    assert a in str(info.value) and b in str(info.value) and "every source" in str(info.value)


def test_local_path_is_verified_in_place(tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(DATA)
    out = tmp_path / "out" / "copy.bin"
    assert download(str(source), out, md5=MD5, size=len(DATA)) == source
    assert not out.exists()
    with pytest.raises(UserError, match=f"md5 is {MD5}, expected {'0' * 32}"):
        download(str(source), out, md5="0" * 32)
    assert source.read_bytes() == DATA  # a user's own file is never deleted


def test_bad_checksum_argument_and_missing_path(tmp_path):
    with pytest.raises(UserError, match="32 hex digits"):
        download("http://127.0.0.1:1/x", tmp_path / "x", md5="xyz")
    with pytest.raises(UserError, match="not found"):
        verify_file(tmp_path / "nothing.bin")


def test_fetch_source_downloads_urls_into_raw_dir(server, tmp_path):
    url = server.add("/files/CUB_200_2011.tgz", DATA)
    path, digests = fetch_source(url + "?download=1", tmp_path / "raw", md5=MD5, **FAST)
    assert path == tmp_path / "raw" / "CUB_200_2011.tgz" and path.read_bytes() == DATA
    assert digests.sha256 == SHA256 and digests.size == len(DATA)
    assert url_filename("https://h/records/x/files/CUB_200_2011.tgz?download=1") == "CUB_200_2011.tgz"


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress("download x.bin", total=4 * 1024 * 1024, stream=stream, interval=0.0)
    progress.update(1024 * 1024)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("download x.bin: 1.0 MiB / 4.0 MiB (25.0%)") and "ETA" in lines[0]
    assert "done in" in lines[-1]


def test_cli_download(server, tmp_path, capsys):
    url = server.add("/data.bin", DATA, mode="drop")
    out = tmp_path / "data.bin"
    assert (
        main(
            [
                "download",
                "--url",
                url,
                "--md5",
                MD5,
                "--size",
                str(len(DATA)),
                "--out",
                str(out),
                "--backoff",
                "0.01",
            ]
        )
        == 0
    )
    assert out.read_bytes() == DATA
    bad = server.add("/nope.bin", DATA, mode="404")
    assert main(["download", "--url", bad, "--out", str(tmp_path / "nope.bin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("negmargin download: error:") and "HTTP 404" in err[-1] and bad in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_failed_re_download_puts_the_earlier_file_back_byte_for_byte(server, tmp_path, capsys):
    """A file that does not verify (here: one put there by hand) is moved aside, not deleted, and is back
    under its name, unchanged, when the new download fails."""
    out = tmp_path / "data.bin"
    by_hand = b"a newer release, placed by hand" * 1000
    out.write_bytes(by_hand)
    broken = server.add("/broken.bin", DATA, mode="500")
    assert main(["download", "--url", broken, "--md5", MD5, "--out", str(out), "--retries", "1",
                 "--backoff", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "moved to data.bin.unverified while a new copy downloads" in err
    assert "earlier file is back in place, unchanged" in err
    assert err.strip().splitlines()[-1].startswith("negmargin download: error:") and "HTTP 500" in err
    assert out.read_bytes() == by_hand
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_a_file_set_aside_by_a_killed_run_is_put_back_then_replaced_once_a_new_one_verifies(server, tmp_path):
    out = tmp_path / "data.bin"
    (tmp_path / "data.bin.unverified").write_bytes(b"stale")  # a run killed while the file was aside
    url = server.add("/data.bin", DATA)
    assert main(["download", "--url", url, "--md5", MD5, "--out", str(out), "--backoff", "0.01"]) == 0
    assert out.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # the verified file, nothing aside

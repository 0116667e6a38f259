"""A job's output root as a local directory or a URI (runner.storage): the same operations on both.
file:// goes through pyarrow's filesystem layer, as s3:// and gs:// do (no bucket here)."""

import pytest

from runner.storage import Location, absolute


@pytest.mark.parametrize("scheme", ["", "file://", "s3://"])
def test_location_reads_writes_lists_and_removes(tmp_path, scheme, request, monkeypatch):
    if scheme == "s3://":  # an S3-compatible server on 127.0.0.1
        uri, credentials = request.getfixturevalue("s3_bucket")
        for key, value in credentials.items():
            monkeypatch.setenv(key, value)
        out = Location(uri)
    else:
        out = Location(f"{scheme}{tmp_path}/out")
    assert not out.exists() and out.names() == []
    (out / "ray" / "search-0" / "x.json").write_text("{}")
    (out / "ray" / "search-1").mkdir()
    (out / "DONE").write_text("done")
    assert out.is_dir() and (out / "DONE").read_text() == "done"
    assert (out / "ray").names("search-") == ["search-0", "search-1"]
    local = tmp_path / "adapter"
    (local / "sub").mkdir(parents=True)
    (local / "adapter_config.json").write_text("{}")
    (local / "sub" / "w.bin").write_bytes(b"\0\1")
    (out / "adapter").write_text("a file where the copy goes")  # replaced, whatever was there
    (out / "adapter").unlink()
    (out / "adapter").upload(local)
    assert (out / "adapter" / "sub" / "w.bin").read_bytes() == b"\0\1"
    (out / "ray").rmtree()
    (out / "DONE").unlink()
    (out / "DONE").unlink()  # already gone: nothing to do
    assert out.names() == ["adapter"] and (out / "adapter" / "adapter_config.json").exists()
    assert str(out / "adapter").startswith(f"{scheme}") and (out / "adapter").name == "adapter"
    assert "?" not in (out / "adapter").path and str(out / "adapter").count("?") == str(out).count("?")


def test_absolute_keeps_uris_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert absolute("outputs/x") == str(tmp_path / "outputs/x")

"""Uploads: only decoded images are kept, under generated names in the run folder; unsafe zips are refused."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sdxl_pivotal.space import uploads
from sdxl_pivotal.space.uploads import add_uploads, list_images, new_run_folder, remove_image


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_images_are_judged_by_decoding_not_by_name(tmp_path):
    folder = new_run_folder(tmp_path / "runs")
    files = [
        write(tmp_path / "photo.png", png_bytes()),
        write(tmp_path / "really-a-png.txt", png_bytes((0, 0, 255))),
        write(tmp_path / "fake.jpg", b"not a jpeg at all"),
        write(tmp_path / "truncated.png", png_bytes()[:60]),
    ]
    report = add_uploads(files, folder / "images")
    assert [p.name for p in report.accepted] == ["img_000.png", "img_001.png"]
    assert len(report.rejected) == 2
    assert report.rejected[0].startswith("fake.jpg: not an image")
    assert report.rejected[1].startswith("truncated.png: not an image")
    with Image.open(folder / "images" / "img_001.png") as stored:
        assert stored.getpixel((0, 0)) == (0, 0, 255)


def test_run_folders_are_fresh_and_names_generated(tmp_path):
    a, b = new_run_folder(tmp_path), new_run_folder(tmp_path)
    assert a != b and a.parent == b.parent == tmp_path
    report = add_uploads([write(tmp_path / "..%2F..%2Fevil.png", png_bytes())], a / "images")
    assert report.accepted == [a / "images" / "img_000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, "..%2F..%2Fevil.png"])


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_zip_images_are_added(tmp_path):
    archive = make_zip(tmp_path / "photos.zip", {"a.png": png_bytes(), "sub/b.png": png_bytes(), "readme.txt": b"hi"})
    report = add_uploads([archive], tmp_path / "images")
    assert len(report.accepted) == 2
    assert report.rejected == ["photos.zip/readme.txt: not an image (it could not be decoded); it was not added."]


@pytest.mark.parametrize("bad_name", ["../escape.png", "ok/../../escape.png", "/etc/escape.png", "C:/escape.png"])
def test_zip_with_escaping_entries_is_refused_whole(tmp_path, bad_name):
    archive = make_zip(tmp_path / "evil.zip", {"fine.png": png_bytes(), bad_name: png_bytes()})
    report = add_uploads([archive], tmp_path / "run" / "images")
    assert report.accepted == []
    assert "evil.zip: refused" in report.rejected[0] and "outside the zip" in report.rejected[0]
    assert list_images(tmp_path / "run" / "images") == []
    assert not list(tmp_path.rglob("escape.png"))


def test_at_most_150_images(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_IMAGES", 3)
    files = [write(tmp_path / f"{i}.png", png_bytes()) for i in range(5)]
    report = add_uploads(files, tmp_path / "images")
    assert len(report.accepted) == 3
    assert report.rejected == [f"{i}.png: refused, a run takes at most 3 images." for i in (3, 4)]


def test_remove_only_accepts_stored_names(tmp_path):
    images = tmp_path / "run" / "images"
    add_uploads([write(tmp_path / "a.png", png_bytes()), write(tmp_path / "b.png", png_bytes())], images)
    uploads.write_caption(images / "img_000.png", "a photo of TOK")
    remove_image(images, "img_000.png")
    assert [p.name for p in list_images(images)] == ["img_001.png"]
    assert not (images / "img_000.txt").exists()
    (tmp_path / "run" / "run.json").write_text("{}")
    for name in ["../run.json", "img_001.txt", "img_1.png"]:
        with pytest.raises(ValueError, match="no stored image"):
            remove_image(images, name)
    assert (tmp_path / "run" / "run.json").exists()
    assert add_uploads([write(tmp_path / "c.png", png_bytes())], images).accepted[0].name == "img_002.png"

"""benchmarks/real_text.py: the page extraction, the crops and the tables (the sources
themselves are downloaded only when the benchmark runs)."""

import io
import tarfile

import numpy as np
from PIL import Image
import pytest

from benchmarks import real_text


def test_pdf_jpeg_finds_the_scanned_page():
  page = np.zeros((995, 770, 3), np.uint8)
  page[100:120, 50:300] = 255
  jpeg = io.BytesIO()
  Image.fromarray(page).save(jpeg, format="JPEG", quality=95)
  pdf = (
    b"%PDF-1.4\n1 0 obj << /Type /XObject /Subtype /Image /Filter /DCTDecode >>\nstream\n"
    + jpeg.getvalue()
    + b"\nendstream\nendobj\ntrailer << >>\n%%EOF\n"
  )
  image = real_text.pdf_jpeg(pdf)
  assert image.size == real_text.GUTENBERG_PAGE_SIZE and image.mode == "RGB"
  assert np.abs(np.asarray(image, float) - page).mean() < 2.0
  with pytest.raises(real_text.SourceUnavailable, match="no embedded JPEG"):
    real_text.pdf_jpeg(b"%PDF-1.4 no image here")


def test_the_word_boxes_fit_their_images():
  w, h = real_text.GUTENBERG_PAGE_SIZE
  for box, text in real_text.GUTENBERG_WORDS:
    assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h and text.strip()
  page = Image.new("RGB", real_text.GUTENBERG_PAGE_SIZE, "white")
  crops = real_text.crops_of(page, real_text.GUTENBERG_WORDS, "gutenberg", "p")
  assert [c.image.shape[:2] for c in crops] == [
    (b[3] - b[1], b[2] - b[0]) for b, _ in real_text.GUTENBERG_WORDS
  ]
  with pytest.raises(real_text.SourceUnavailable, match="outside"):
    real_text.crops_of(Image.new("RGB", (100, 100)), real_text.GUTENBERG_WORDS, "g", "p")


def test_tables_score_with_the_36_character_protocol():
  crops = [
    real_text.Crop("a", "a_1", np.zeros((4, 4, 3), np.uint8), "Watson,"),
    real_text.Crop("a", "a_2", np.zeros((4, 4, 3), np.uint8), "didn\u2019t"),
    real_text.Crop("b", "b_1", np.zeros((4, 4, 3), np.uint8), "CHINA"),
  ]
  preds = {"mms_jax": ["watson", "didnt", "chna"], "peer": ["", "didn't", "CHINA"]}
  summary = real_text.summary_table(crops, preds).splitlines()
  assert summary[2:] == [
    "| mms_jax | a | 2 | 100.0 | 100.0 |",
    "| mms_jax | b | 1 | 0.0 | 80.0 |",
    "| peer | a | 2 | 50.0 | 50.0 |",
    "| peer | b | 1 | 100.0 | 100.0 |",
  ]
  rows = real_text.crop_table(crops, preds, confidences=[0.9, 0.5, 0.1]).splitlines()
  assert rows[2] == "| a_1 | Watson, | `watson` 0.90 ✓ | (empty) |"
  assert rows[4] == "| b_1 | CHINA | `chna` 0.10 | `CHINA` ✓ |"


def test_a_broken_source_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
  # An sdist without the scanned page, and a .deb that is not one: each source is
  # skipped with a line that says why, instead of stopping the benchmark.
  sdist = tmp_path / "ocrmypdf-17.13.0.tar.gz"
  with tarfile.open(sdist, "w:gz") as tar:
    info = tarfile.TarInfo("ocrmypdf-17.13.0/README.md")
    tar.addfile(info, io.BytesIO(b""))
  monkeypatch.setattr(real_text, "pypi_sdist", lambda name, version, cache: sdist)
  (tmp_path / "opencv-doc_0_all.deb").write_bytes(b"not a deb")
  assert real_text.load_crops(["gutenberg", "opencv"], tmp_path) == []
  out = capsys.readouterr().out
  assert "[skip] gutenberg:" in out and "tests/resources/c03-29.pdf" in out
  assert "[skip] opencv:" in out and ("dpkg-deb" in out or "cannot read" in out)

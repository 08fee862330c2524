"""Unit tests for the held-out bench's frames and scoring (no agent, no sockets)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from agent.lab.bench.heldout import frame_for, score
from protocol import Decision, Encoding, decode_frame, encode_frame
from tests.unit.test_protocol import make_shed, make_verdict


class TestFrameFor:
    """A held-out image goes out as a camera would send it: its own bytes, its own size."""

    def test_jpeg_at_native_size(self, magnetic_tile: Path) -> None:
        """A Magnetic-tile JPEG travels as its file bytes with the file's own width and height, and decodes back."""
        path = next(iter(sorted((magnetic_tile / "MT_Blowhole" / "Imgs").glob("*.jpg"))))
        f = decode_frame(encode_frame(frame_for(path, 7, "MT_Blowhole", "file")))
        h, w = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
        assert (f.encoding, f.width, f.height, f.seq, f.label) == (Encoding.JPEG, w, h, 7, "MT_Blowhole")
        assert bytes(f.payload) == path.read_bytes()

    def test_gray8(self, magnetic_tile: Path, tmp_path: Path) -> None:
        """--encoding gray8 (or a file that is neither JPEG nor PNG) sends the decoded pixels."""
        path = next(iter(sorted((magnetic_tile / "MT_Free" / "Imgs").glob("*.jpg"))))
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        f = frame_for(path, 0, "MT_Free", "gray8")
        assert f.encoding is Encoding.GRAY8 and (f.height, f.width) == img.shape
        bmp = tmp_path / "x.bmp"
        cv2.imwrite(str(bmp), img)
        g = frame_for(bmp, 1, "MT_Free", "file")
        assert g.encoding is Encoding.GRAY8 and np.array_equal(np.frombuffer(g.payload, np.uint8), img.ravel())


class TestScore:
    """Verdicts scored against labels as the model card scores Keras outputs."""

    def test_escapes_false_rejects_and_fail_safe(self) -> None:
        """A defect decided pass is an escape, a good part not passed a false reject, a shed verdict a divert."""
        classes, passes = ("scratches", "good"), ("good",)
        y = np.array([0, 1, 1, 0])
        verdicts = {
            0: make_verdict(seq=0, class_name="good", class_index=1, decision=Decision.PASS, defect=False),
            1: make_verdict(seq=1, class_name="good", class_index=1, decision=Decision.PASS, defect=False),
            2: make_verdict(seq=2, class_name="good", class_index=1, decision=Decision.REVIEW),
            3: make_shed(seq=3, decision=Decision.DIVERT),
        }
        r = score(verdicts, y, classes, passes)
        assert (r["escapes"], r["false_rejects"], r["pass"], r["divert"], r["review"]) == (1, 1, 2, 1, 1)
        assert r["accuracy"] == 0.5 and r["not_ok"] == 1

"""Video I/O: H.264 round trips within codec tolerance, odd sizes, clear errors, PNG preview strips."""

import cv2
import numpy as np
import pytest

from data.video import VideoError, decode_mp4_bytes, encode_mp4_bytes, read_mp4, write_mp4, write_png_strip

# Tolerance for H.264 (crf 18, yuv420p) on smooth frames: mean absolute error below 3/255 (measured
# ~1.5: most of it is the RGB -> 4:2:0 -> RGB conversion, which alone costs ~1 on these frames).
MP4_MAE = 3.0


def smooth_frames(F: int, H: int, W: int) -> np.ndarray:
    """Low-frequency moving colour waves: what a lossy codec should reproduce closely, [F, H, W, 3] uint8."""
    f, y, x, c = np.meshgrid(np.arange(F), np.arange(H) / H, np.arange(W) / W, np.arange(3), indexing="ij")
    v = 128 + 50 * np.sin(2 * np.pi * (0.3 * x + 0.2 * y + 0.02 * f) + 0.8 * c)
    return v.round().astype(np.uint8)


def test_mp4_bytes_round_trip_within_tolerance():
    frames = smooth_frames(12, 32, 48)
    data = encode_mp4_bytes(frames, fps=16, crf=18)
    assert data[4:8] == b"ftyp"  # an MP4 container
    out = decode_mp4_bytes(data)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.abs(out.astype(int) - frames).mean() < MP4_MAE
    # A much worse quality setting must be measurably worse: the crf reaches the encoder.
    coarse = decode_mp4_bytes(encode_mp4_bytes(frames, crf=45))
    assert np.abs(coarse.astype(int) - frames).mean() > np.abs(out.astype(int) - frames).mean()


def test_mp4_file_round_trip_odd_size_and_fractional_fps(tmp_path):
    frames = smooth_frames(7, 33, 47)  # odd height and width: padded for yuv420p, cropped on read
    path = tmp_path / "sub" / "clip.mp4"
    write_mp4(path, frames, fps=29.97)
    out = read_mp4(path)
    assert out.shape == frames.shape
    assert np.abs(out.astype(int) - frames).mean() < MP4_MAE
    assert read_mp4(path.read_bytes()).shape == frames.shape


def test_mp4_rejects_bad_frames_and_bad_bytes(tmp_path):
    with pytest.raises(VideoError, match=r"uint8 \[F, H, W, 3\].*float32 \[2, 8, 8, 3\]"):
        encode_mp4_bytes(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(VideoError, match=r"\[2, 8, 8, 4\]"):
        write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 4), np.uint8))
    good = encode_mp4_bytes(smooth_frames(4, 16, 16))
    for bad in (b"not a video at all" * 8, good[: len(good) // 2]):
        with pytest.raises(VideoError, match="my-sample: cannot decode"):
            decode_mp4_bytes(bad, where="my-sample")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_mp4(tmp_path / "missing.mp4")


@pytest.mark.parametrize("F, num, expect", [(20, 8, [0, 3, 5, 8, 11, 14, 16, 19]), (3, 8, [0, 1, 2])])
def test_png_strip_has_evenly_spaced_frames(tmp_path, F, num, expect):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (F, 10, 6, 3), dtype=np.uint8)
    path = tmp_path / "strip.png"
    write_png_strip(path, frames, num=num)
    strip = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert strip.shape == (10, 6 * len(expect), 3)
    for i, f in enumerate(expect):  # PNG is lossless and colours are stored as RGB
        np.testing.assert_array_equal(strip[:, 6 * i : 6 * (i + 1)], frames[f])

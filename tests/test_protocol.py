"""The msgpack frame-batch wire format: exact round trips, and a clear 4xx error for every malformed input."""
from __future__ import annotations

import io

import msgpack
import numpy as np
import pytest
from PIL import Image

from serve.core.protocol import (
    FrameFormatError,
    FrameLimits,
    PayloadTooLargeError,
    ProtocolError,
    decode_frames,
    encode_frames,
)


def _rgb(n: int = 3, h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _smooth(n: int = 2, h: int = 48, w: int = 64) -> np.ndarray:
    """Gradients compress well in JPEG, so a lossy round trip stays close."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
    return np.stack([(base + 10 * i) % 256 for i in range(n)]).astype(np.uint8)


def _raw_msg(**overrides):
    rgb = _rgb(2)
    msg = {"v": 1, "encoding": "raw", "pts": [0.0, 0.5], "shape": [2, 24, 40, 3], "dtype": "uint8",
           "data": rgb.tobytes()}
    msg.update(overrides)
    return msgpack.packb(msg, use_bin_type=True)


def test_raw_round_trip_is_exact():
    rgb = _rgb(5)
    batch = decode_frames(encode_frames(rgb, [0.0, 0.1, 0.2, 0.2, 0.3]))
    assert np.array_equal(batch.rgb, rgb)
    assert batch.pts.tolist() == [0.0, 0.1, 0.2, 0.2, 0.3]
    assert batch.indices.tolist() == [0, 1, 2, 3, 4]


def test_jpeg_round_trip_is_close_and_smaller():
    rgb = _smooth(3)
    body = encode_frames(rgb, [1.0, 2.0, 3.0], encoding="jpeg", jpeg_quality=95)
    batch = decode_frames(body)
    assert batch.rgb.shape == rgb.shape and batch.rgb.dtype == np.uint8
    assert np.abs(batch.rgb.astype(int) - rgb.astype(int)).mean() < 3.0
    assert len(body) < len(encode_frames(rgb, [1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"\xc1", "not a valid msgpack"),
        (b"\x93\x01", "not a valid msgpack"),  # truncated array
        (_raw_msg() + b"x", "not a valid msgpack"),  # trailing bytes
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({1: 2}), "not a valid msgpack"),  # non-string key
        (_raw_msg(v=2), "'v' must be 1"),
        (_raw_msg(encoding="png"), "'encoding' must be 'raw' or 'jpeg'"),
        (_raw_msg(pts="0,1"), "'pts' must be a list of numbers"),
        (_raw_msg(pts=[True, False]), "'pts' must be a list of numbers"),
        (_raw_msg(data="text"), "needs field 'data'"),
        (msgpack.packb({"v": 1, "encoding": "jpeg", "pts": [0.0], "images": "x"}), "'images'"),
    ],
)
def test_malformed_messages_are_400(body, fragment):
    with pytest.raises(ProtocolError, match=fragment) as info:
        decode_frames(body)
    assert info.value.status == 400
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"dtype": "float32"}, "dtype 'float32' is not supported"),
        ({"shape": [2, 24, 40]}, "'shape' must be \\[N, H, W, 3\\]"),
        ({"shape": [2, 24, 40, 4]}, "3 RGB channels"),
        ({"shape": [3, 24, 40, 3]}, "does not match 2 pts"),
        ({"shape": [2, 20, 40, 3]}, "'data' has 5760 bytes"),
        ({"pts": [1.0, 0.5]}, "non-decreasing"),
        ({"pts": [0.0, float("nan")]}, "finite"),
        ({"pts": []}, "no frames"),
    ],
)
def test_wrong_shape_dtype_or_pts_are_422(overrides, fragment):
    with pytest.raises(FrameFormatError, match=fragment) as info:
        decode_frames(_raw_msg(**overrides))
    assert info.value.status == 422


def test_limits_are_413():
    body = encode_frames(_rgb(4), [0, 1, 2, 3])
    with pytest.raises(PayloadTooLargeError, match="over the 1024-byte limit"):
        decode_frames(body, FrameLimits(max_bytes=1024))
    with pytest.raises(PayloadTooLargeError, match="4 frames, over the limit of 3"):
        decode_frames(body, FrameLimits(max_frames=3))
    with pytest.raises(PayloadTooLargeError, match="exceeds the 32-pixel side limit"):
        decode_frames(body, FrameLimits(max_side=32))


def test_jpeg_side_limit_is_checked_before_decoding():
    """A tiny JPEG that declares a huge size is refused from its header (no decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (6000, 8)).save(buf, format="JPEG")
    body = msgpack.packb({"v": 1, "encoding": "jpeg", "pts": [0.0], "images": [buf.getvalue()]})
    assert len(body) < 20_000
    with pytest.raises(PayloadTooLargeError, match="6000x8"):
        decode_frames(body, FrameLimits(max_side=4096))


def test_bad_images_are_422():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    good = encode_frames(_smooth(1, 16, 16), [0.0], encoding="jpeg")
    jpeg16 = msgpack.unpackb(good)["images"][0]
    other = msgpack.unpackb(encode_frames(_smooth(1, 8, 16), [0.0], encoding="jpeg"))["images"][0]
    cases = [
        ([png.getvalue()], [0.0], "is PNG, not JPEG"),
        ([b"\xff\xd8\xff garbage"], [0.0], "not a decodable JPEG"),
        ([jpeg16, other], [0.0, 1.0], "must share a size"),
        ([jpeg16], [0.0, 1.0], "1 images but 2 pts"),
    ]
    for images, pts, fragment in cases:
        body = msgpack.packb({"v": 1, "encoding": "jpeg", "pts": pts, "images": images})
        with pytest.raises(FrameFormatError, match=fragment):
            decode_frames(body)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(_rgb(1).astype(np.float32), [0.0])
    with pytest.raises(ValueError, match="encoding must be"):
        encode_frames(_rgb(1), [0.0], encoding="png")

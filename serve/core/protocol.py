"""Wire format of pushed frames: one msgpack map per batch (``Content-Type: application/msgpack``).

Version 1, two encodings; every frame of a batch has the same size::

    {"v": 1, "encoding": "raw",  "pts": [0.0, 0.1], "shape": [2, 480, 640, 3], "dtype": "uint8", "data": <bin>}
    {"v": 1, "encoding": "jpeg", "pts": [0.0, 0.1], "images": [<bin>, <bin>]}

``data`` holds ``N*H*W*3`` bytes of RGB pixels in C order; ``images`` holds one baseline/progressive JPEG per frame.
``pts`` are presentation times in seconds, finite and non-decreasing. Decoding errors are
:class:`stream.errors.RequestError` subclasses carrying their HTTP status (400 malformed, 413 too large,
422 wrong shape/dtype/pixels), so the service answers 4xx for that request alone.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np
from PIL import Image

from stream.errors import RequestError
from stream.frames import FrameBatch

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"
CONTENT_TYPES = (CONTENT_TYPE, "application/x-msgpack", "application/vnd.msgpack")


class ProtocolError(RequestError):
    """The body is not a valid frame batch message (bad msgpack, missing or mistyped field)."""

    status = 400


class PayloadTooLargeError(RequestError):
    """The body, the batch or a frame exceeds a configured limit."""

    status = 413


class FrameFormatError(RequestError):
    """The frames have the wrong shape, dtype or size, or an image does not decode."""

    status = 422


@dataclass(frozen=True)
class FrameLimits:
    """Limits applied while decoding; the service fills them from its settings.

    Attributes:
        max_bytes: largest message accepted.
        max_frames: most frames in one batch.
        max_side: largest frame height or width in pixels.
    """

    max_bytes: int = 64 * 2**20
    max_frames: int = 256
    max_side: int = 4096


def encode_frames(rgb: np.ndarray, pts: Sequence[float], encoding: str = "raw", jpeg_quality: int = 90) -> bytes:
    """Pack ``rgb [N, H, W, 3]`` uint8 frames and their ``pts`` (seconds) into one message.

    Args:
        encoding: ``"raw"`` (exact pixels) or ``"jpeg"`` (about 10-20x smaller, lossy).
        jpeg_quality: 1..95, used for ``"jpeg"``.
    """
    batch = FrameBatch(rgb=rgb, pts=np.asarray(pts, dtype=np.float64), indices=np.arange(len(rgb)))
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "encoding": encoding, "pts": batch.pts.tolist()}
    if encoding == "raw":
        msg.update(shape=list(batch.rgb.shape), dtype="uint8", data=np.ascontiguousarray(batch.rgb).tobytes())
    elif encoding == "jpeg":
        msg["images"] = [jpeg_bytes(frame, jpeg_quality) for frame in batch.rgb]
    else:
        raise ValueError(f"encoding must be 'raw' or 'jpeg', got {encoding!r}")
    return msgpack.packb(msg, use_bin_type=True)


def decode_frames(body: bytes, limits: FrameLimits = FrameLimits()) -> FrameBatch:
    """Unpack and validate one message into a :class:`FrameBatch` (indices ``0..N-1``; the stream renumbers them).

    Raises:
        PayloadTooLargeError: body, frame count or frame size over ``limits`` (413).
        ProtocolError: not msgpack, wrong version, missing or mistyped fields (400).
        FrameFormatError: shape/dtype/byte count mismatch, pts invalid, undecodable JPEG (422).
    """
    if len(body) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"frame batch is {len(body)} bytes, over the {limits.max_bytes}-byte limit. "
            "Fix: send fewer frames per request, or JPEG instead of raw."
        )
    msg = _unpack(body, limits)
    encoding = msg.get("encoding")
    pts = _read_pts(msg, limits)
    if encoding == "raw":
        rgb = _decode_raw(msg, len(pts), limits)
    elif encoding == "jpeg":
        rgb = _decode_jpeg_list(msg, len(pts), limits)
    else:
        raise ProtocolError(f"field 'encoding' must be 'raw' or 'jpeg', got {encoding!r}. Fix: set one of them.")
    try:
        return FrameBatch(rgb=rgb, pts=pts, indices=np.arange(len(pts)))
    except ValueError as exc:
        raise FrameFormatError(str(exc)) from None


def _unpack(body: bytes, limits: FrameLimits) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_bytes,
            max_str_len=1024,
            max_array_len=max(limits.max_frames, 8),
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise ProtocolError(
            f"body is not a valid msgpack frame batch ({type(exc).__name__}: {exc}). "
            "Fix: pack a map with serve.core.protocol.encode_frames (or see the README's wire format)."
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(msg).__name__}. Fix: send a map with 'v' = 1.")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"field 'v' must be {PROTOCOL_VERSION}, got {msg.get('v')!r}. Fix: set 'v': 1.")
    return msg


MAX_PTS_S = 1e9  # ~31 years of stream time


def _read_pts(msg: dict[str, Any], limits: FrameLimits) -> np.ndarray:
    pts = msg.get("pts")
    if not isinstance(pts, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in pts):
        raise ProtocolError("field 'pts' must be a list of numbers (seconds, one per frame). Fix: add it.")
    if not pts:
        raise FrameFormatError("the batch has no frames ('pts' is empty). Fix: send at least one frame.")
    if len(pts) > limits.max_frames:
        raise PayloadTooLargeError(
            f"batch has {len(pts)} frames, over the limit of {limits.max_frames}. Fix: split it into smaller batches."
        )
    out = np.asarray(pts, dtype=np.float64)  # [N]
    if not all(math.isfinite(t) for t in pts) or np.any(np.diff(out) < 0):
        raise FrameFormatError(f"'pts' must be finite and non-decreasing, got {pts[:8]}. Fix: send stream times.")
    if np.any(np.abs(out) > MAX_PTS_S):  # 1e308 would pass and then make every later push 'backwards'
        raise FrameFormatError(
            f"'pts' must lie within +-{MAX_PTS_S:g} s, got {float(out[np.argmax(np.abs(out))])}. Fix: send seconds "
            "since the stream started."
        )
    return out


def _decode_raw(msg: dict[str, Any], n: int, limits: FrameLimits) -> np.ndarray:
    shape, dtype, data = msg.get("shape"), msg.get("dtype"), msg.get("data")
    if not isinstance(data, bytes):
        raise ProtocolError("raw batch needs field 'data' (binary, N*H*W*3 bytes). Fix: add it as msgpack bin.")
    if dtype != "uint8":
        raise FrameFormatError(f"dtype {dtype!r} is not supported; frames must be 'uint8' RGB 0..255. Fix: convert.")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(s) is int and s > 0 for s in shape)):
        raise FrameFormatError(f"'shape' must be [N, H, W, 3] of positive ints, got {shape!r}. Fix: send RGB frames.")
    if shape[0] != n or shape[3] != 3:
        raise FrameFormatError(
            f"'shape' {shape} does not match {n} pts and 3 RGB channels. Fix: shape = [len(pts), H, W, 3]."
        )
    _check_side(shape[1], shape[2], limits)
    want = shape[0] * shape[1] * shape[2] * 3
    if len(data) != want:
        raise FrameFormatError(f"'data' has {len(data)} bytes, shape {shape} needs {want}. Fix: send C-order pixels.")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)  # [N, H, W, 3]


def _decode_jpeg_list(msg: dict[str, Any], n: int, limits: FrameLimits) -> np.ndarray:
    images = msg.get("images")
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise ProtocolError("jpeg batch needs field 'images' (a list of binary JPEGs). Fix: add it.")
    if len(images) != n:
        raise FrameFormatError(f"{len(images)} images but {n} pts. Fix: send one pts per image.")
    frames = [_decode_jpeg(blob, i, limits) for i, blob in enumerate(images)]
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise FrameFormatError(f"images in one batch must share a size, got {sorted(sizes)}. Fix: resize them.")
    return np.stack(frames)  # [N, H, W, 3]


def _decode_jpeg(blob: bytes, i: int, limits: FrameLimits) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.format != "JPEG":
                raise FrameFormatError(f"images[{i}] is {img.format}, not JPEG. Fix: encode frames as JPEG.")
            _check_side(img.height, img.width, limits)  # before decoding the pixels (decompression bombs)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    except FrameFormatError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameFormatError(f"images[{i}] is not a decodable JPEG ({exc}). Fix: send valid JPEG bytes.") from None


def _check_side(height: int, width: int, limits: FrameLimits) -> None:
    if height > limits.max_side or width > limits.max_side:
        raise PayloadTooLargeError(
            f"frame size {width}x{height} exceeds the {limits.max_side}-pixel side limit. Fix: downscale the frames."
        )


def jpeg_bytes(rgb: np.ndarray, quality: int = 80) -> bytes:
    """``[H, W, 3]`` uint8 RGB -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()

"""Wire format of pushed frames: one msgpack map per batch (``Content-Type: application/msgpack``).

Version 1, two encodings; every frame of a batch has the same size::

    {"v": 1, "encoding": "raw",  "pts": [0.0, 0.1], "shape": [2, 480, 640, 3], "dtype": "uint8", "data": <bin>}
    {"v": 1, "encoding": "jpeg", "pts": [0.0, 0.1], "images": [<bin>, <bin>]}

``data`` holds ``N*H*W*3`` bytes of RGB pixels in C order; ``images`` holds one baseline/progressive JPEG per frame.
``pts`` are presentation times in seconds, finite and non-decreasing. Decoding errors are
:class:`stream.errors.RequestError` subclasses carrying their HTTP status (400 malformed, 413 too large,
422 wrong shape/dtype/pixels), so the service answers 4xx for that request alone.

Decompression bombs: a JPEG of a few hundred bytes may declare 4096x4096 pixels. Every size is read from the image
headers first; the batch's declared pixels (frames x height x width) are checked against ``max_pixels`` -- and
offered to the caller's ``admit`` hook (a per-stream budget) -- before a single pixel is decoded, and the frames are
then decoded one at a time into one preallocated ``[N, H, W, 3]`` array.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
        max_pixels: most pixels (frames x height x width) one batch may hold once decoded.
    """

    max_bytes: int = 64 * 2**20
    max_frames: int = 256
    max_side: int = 4096
    max_pixels: int = 1 << 24


Admit = Callable[[int], None]  # told a batch's declared pixels before decoding; raises to refuse it


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


def decode_frames(body: bytes, limits: FrameLimits = FrameLimits(), admit: Admit | None = None) -> FrameBatch:
    """Unpack and validate one message into a :class:`FrameBatch` (indices ``0..N-1``; the stream renumbers them).

    Args:
        admit: called with the batch's declared pixels after every size check and before any decoding (e.g. a
            per-stream budget); whatever it raises refuses the batch.

    Raises:
        PayloadTooLargeError: body, frame count, frame size or declared pixels over ``limits`` (413).
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
        rgb = _decode_raw(msg, len(pts), limits, admit)
    elif encoding == "jpeg":
        rgb = _decode_jpeg_list(msg, len(pts), limits, admit)
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
        if "max_array_len" in str(exc):  # more frames (pts or images) than any batch may have: a size problem
            raise PayloadTooLargeError(
                f"batch has more than {max(limits.max_frames, 8)} frames (the limit is {limits.max_frames}). Fix: "
                "split it into smaller batches."
            ) from None
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


def _decode_raw(msg: dict[str, Any], n: int, limits: FrameLimits, admit: Admit | None) -> np.ndarray:
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
    _check_pixels(shape[0], shape[1], shape[2], limits, admit)
    want = shape[0] * shape[1] * shape[2] * 3
    if len(data) != want:
        raise FrameFormatError(f"'data' has {len(data)} bytes, shape {shape} needs {want}. Fix: send C-order pixels.")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)  # [N, H, W, 3]


def _decode_jpeg_list(msg: dict[str, Any], n: int, limits: FrameLimits, admit: Admit | None) -> np.ndarray:
    """1. every image's declared size from its header, 2. the batch's pixels against the limits, 3. decode."""
    images = msg.get("images")
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise ProtocolError("jpeg batch needs field 'images' (a list of binary JPEGs). Fix: add it.")
    if len(images) != n:
        raise FrameFormatError(f"{len(images)} images but {n} pts. Fix: send one pts per image.")
    sizes = [_jpeg_size(blob, i, limits) for i, blob in enumerate(images)]  # (width, height), headers only
    if len(set(sizes)) != 1:
        raise FrameFormatError(f"images in one batch must share a size, got {sorted(set(sizes))}. Fix: resize them.")
    width, height = sizes[0]
    _check_pixels(n, height, width, limits, admit)
    out = np.empty((n, height, width, 3), dtype=np.uint8)  # [N, H, W, 3], filled one frame at a time
    for i, blob in enumerate(images):
        out[i] = _decode_jpeg(blob, i)
    return out


def _jpeg_size(blob: bytes, i: int, limits: FrameLimits) -> tuple[int, int]:
    """``(width, height)`` an image declares (its header only: no pixel is decoded here)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.format != "JPEG":
                raise FrameFormatError(f"images[{i}] is {img.format}, not JPEG. Fix: encode frames as JPEG.")
            size = (int(img.width), int(img.height))
    except FrameFormatError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameFormatError(f"images[{i}] is not a decodable JPEG ({exc}). Fix: send valid JPEG bytes.") from None
    _check_side(size[1], size[0], limits)
    return size


def _decode_jpeg(blob: bytes, i: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB pixels of one JPEG whose header was checked already."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            rgb = img if img.mode == "RGB" else img.convert("RGB")  # no copy when it is RGB already
            return np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameFormatError(f"images[{i}] is not a decodable JPEG ({exc}). Fix: send valid JPEG bytes.") from None


def _check_pixels(n: int, height: int, width: int, limits: FrameLimits, admit: Admit | None) -> None:
    pixels = n * height * width
    if pixels > limits.max_pixels:
        raise PayloadTooLargeError(
            f"batch declares {n} frames of {width}x{height} = {pixels:,} pixels, over the limit of "
            f"{limits.max_pixels:,} decoded pixels per push (serve.max_push_pixels). Fix: send fewer or smaller "
            "frames per request."
        )
    if admit is not None:
        admit(pixels)


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

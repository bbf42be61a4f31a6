"""Image files written byte by byte where Pillow cannot write them (48-bit RGB, 16-bit grey+alpha, 4-bit grey PNG)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# PNG colour types
GREY, RGB, GREY_ALPHA, RGB_ALPHA = 0, 2, 4, 6


def write_png(path: Path, values: np.ndarray, bit_depth: int, colour_type: int) -> Path:
    """A PNG of ``values`` ((H, W) or (H, W, C) at 8 or 16 bit), no filtering, no interlace."""
    values = np.asarray(values)
    dtype = ">u2" if bit_depth == 16 else np.uint8
    rows = [values[y].astype(dtype).tobytes() for y in range(values.shape[0])]
    return write_png_rows(path, values.shape[1], bit_depth, colour_type, rows)


def write_png_rows(path: Path, width: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> Path:
    """A PNG from packed scanlines, for depths numpy cannot hold (1, 2 or 4 bits per sample)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, len(rows), bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\0" + row for row in rows)  # filter type 0 before every scanline
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path

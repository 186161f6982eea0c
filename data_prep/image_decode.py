"""Image bytes -> uint8 RGB tensors (3, H, W), by the fastest decoder this install has.

torchvision.io's libjpeg-turbo decoder is about 1.4x faster than PIL on 256 px JPEGs (see
bench/loader.py); torchvision marks it deprecated in favour of TorchCodec, so PIL is the fallback
when it is absent, and for the formats and modes it refuses (CMYK JPEGs, GIF, TIFF).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as _torchvision_decode
except ImportError:  # a torchvision without image decoding
    _torchvision_decode = None


def decode_with_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W), channels-last in memory


def decode_with_torchvision(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torchvision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_rgb(data: bytes) -> torch.Tensor:
    """uint8 (3, H, W); raises (PIL's error) when neither decoder can read the bytes."""
    if _torchvision_decode is not None:
        try:
            return decode_with_torchvision(data)
        except RuntimeError:
            pass  # a format or mode torchvision does not decode: PIL tries, and its error is the one shown
    return decode_with_pil(data)

"""Open an image as RGB, or say why it cannot be used."""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow's own warning for images past its decompression-bomb threshold names no file: load_image
# gives one that does.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Modes that Pillow's convert("RGB") clips to 0..255 instead of rescaling: 16-bit grayscale (PNG,
# TIFF), "I" (32-bit integers: older Pillow's 16-bit PNGs, signed or 32-bit TIFFs) and 32-bit floats.
_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L")
_FLOAT_MODE = "F"


class BadImage(Exception):
    """Why an item's image cannot be used; recorded next to the item."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_image(path: str | Path) -> Image.Image:
    """The decoded image in RGB.

    `verify` checks the file's structure but leaves the image unusable, so the file is opened
    again and decoded in full: truncated data only shows up then.
    """
    try:
        if Path(path).stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if Image.MAX_IMAGE_PIXELS and (pixels := image.width * image.height) > Image.MAX_IMAGE_PIXELS:
                warnings.warn(f"{path}: {image.width}x{image.height} = {pixels / 1e6:.0f} Mpx, past Pillow's "
                              f"decompression-bomb threshold of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx: decoded, as Pillow "
                              f"does below twice it (larger images are recorded as bad items)", stacklevel=2)
            if image.mode not in (*_INTEGER_MODES, _FLOAT_MODE):
                return image.convert("RGB")
            mode, pixels = image.mode, np.asarray(image)
    except BadImage:
        raise
    except Exception as e:  # Pillow's decoders raise many exception types on corrupt input
        raise BadImage(f"cannot decode image: {e}") from e
    return Image.fromarray(_eight_bits(pixels, mode)).convert("RGB")


def _eight_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale scaled to 0..255 from the full scale of its type: 0..65535 for integers, 0..1 for
    floats. Values beyond that scale have no meaning we could know, so the image is refused."""
    if mode == _FLOAT_MODE:
        if not np.isfinite(pixels).all():
            raise BadImage("float image with NaN or infinite values: save it as 8- or 16-bit integers")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 1:
            raise BadImage(f"float image with values in [{low:g}, {high:g}], outside [0, 1]: scale it to "
                           "[0, 1] or save it as 8- or 16-bit integers")
        return np.round(pixels.astype(np.float64) * 255).astype(np.uint8)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise BadImage(f"integer image with values in [{low}, {high}], outside the 16-bit range 0..65535: "
                       "save it as 8- or 16-bit integers")
    return np.round(pixels.astype(np.float64) * (255 / 65535)).astype(np.uint8)

"""Open an image as RGB, or say why it cannot be used."""

from pathlib import Path

from PIL import Image


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
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # Pillow's decoders raise many exception types on corrupt input
        raise BadImage(f"cannot decode image: {e}") from e

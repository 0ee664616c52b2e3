"""Image files with errors that name them."""

import os

from detectron2.data import detection_utils as utils

__all__ = ["UnreadableImageError", "require_image_file", "read_image_or_raise"]


class UnreadableImageError(OSError):
    """An image file that exists but cannot be decoded (training skips it, see
    :class:`afigan.data.loader.ResumableBatches`; evaluation stops)."""

    def __init__(self, file_name: str, error: BaseException = None):
        if error is None:  # rebuilt from its message (PyTorch's DataLoader re-raises a worker's error that way)
            super().__init__(file_name)
            self.file_name = ""
            return
        super().__init__(
            f"Cannot read image {file_name!r} ({type(error).__name__}: {' '.join(str(error).split())}); "
            f"replace or remove it from the data set."
        )
        self.file_name = file_name


def require_image_file(file_name: str) -> str:
    """Return ``file_name`` if it exists, else raise FileNotFoundError naming it."""
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file {file_name!r} does not exist (check the data set's image root).")
    return file_name


def read_image_or_raise(file_name: str, image_format: str):
    """Read an image as Detectron2 does (EXIF-transposed, in ``image_format``); a missing or
    unreadable file raises :class:`UnreadableImageError` naming it."""
    require_image_file(file_name)
    try:
        return utils.read_image(file_name, format=image_format)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a corrupt file
        raise UnreadableImageError(file_name, e) from None

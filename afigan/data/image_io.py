"""Reading images with an error that names the file."""
import os

from detectron2.data import detection_utils as utils

__all__ = ["read_image_or_raise"]


def read_image_or_raise(file_name: str, image_format: str, check_only: bool = False):
    """Read an image as Detectron2 does (EXIF-transposed, in ``image_format``); an unreadable or
    missing file raises ``OSError`` naming it. With ``check_only`` only existence is checked."""
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file {file_name!r} does not exist (check the data set's image root).")
    if check_only:
        return None
    try:
        return utils.read_image(file_name, format=image_format)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a corrupt file
        raise OSError(f"Cannot read image {file_name!r}: {type(e).__name__}: {e}") from None

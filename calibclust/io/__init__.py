"""Torch-free I/O shared by training, export calibration and serving."""

from calibclust.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageFolderListing,
    decode_image,
    discover_images,
    list_image_folder,
    load_image,
    load_images,
    resize_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFolderListing",
    "decode_image",
    "discover_images",
    "list_image_folder",
    "load_image",
    "load_images",
    "resize_image",
]

"""Guest image builder: kernel resolution, modules, reproducible initramfs, cache.

Public API: ensure_image(), image_status(), GuestImage, ImageError (docs/image.md).
"""
from .build import GuestImage, ensure_image, image_status
from .helper import build_guest_helper
from .kernel import ImageError

__all__ = ["GuestImage", "ImageError", "build_guest_helper", "ensure_image", "image_status"]

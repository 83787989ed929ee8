"""nasquant: selective INT8 quantization, export and validation for YOLO-NAS detectors."""

from nasquant._version import __version__

__all__ = ["NAS", "__version__"]


def __getattr__(name: str):
    # Lazy, so `nasquant --help` and `import nasquant.errors` don't pay for torch, cv2 and pycocotools.
    if name == "NAS":
        from nasquant.api import NAS

        return NAS
    raise AttributeError(f"module 'nasquant' has no attribute {name!r}")

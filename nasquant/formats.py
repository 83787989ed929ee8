"""Facts shared by the producers and consumers of nasquant's inputs and files, in a light module: the
CLI and the recipe reader import it without loading torch, OpenCV or ONNX.
"""

#: an exported ONNX graph, run by ONNX Runtime
ONNX_SUFFIX = ".onnx"
#: a serialized TensorRT engine, run by TensorRT
ENGINE_SUFFIXES = (".engine", ".plan")
#: every exported file a backend (not a checkpoint loader) opens
EXPORTED_SUFFIXES = (ONNX_SUFFIX, *ENGINE_SUFFIXES)

#: In a run folder: who holds its lock (JSON), present only while a run holds it or after one was killed.
LOCK_NAME = ".nasquant.lock"
#: In a run folder: the calibration images' file names, one per line (a ``calibration.image_list``).
CALIBRATION_LIST_NAME = "calibration_images.txt"
#: In a run folder: each stage's wall time, ``{"stages": [{"stage", "summary", "seconds", "reused"}]}``.
TIMINGS_NAME = "timings.json"

#: Input side when neither the user nor the checkpoint says (Deci's COCO models are 640).
DEFAULT_IMGSZ = 640
#: The neck joins stride-8/16/32 maps by 2x up/down-sampling: input sides must divide by 32.
MAX_STRIDE = 32
#: Largest input side nasquant accepts: 4x the usual 1280 of high-resolution detection. One float32
#: 8192^2 image is 805 MB; a larger side only ever comes from a typo or a crafted file.
MAX_INPUT_SIZE = 8192

#: QuantizeLinear/DequantizeLinear with a per-channel ``axis`` exist from opset 13 on.
MIN_OPSET = 13
#: The highest opset torch's TorchScript ONNX exporter writes (``torch.onnx._constants``; a test
#: checks it against the installed torch). ModelOpt's Q/DQ symbolics exist only in that exporter.
MAX_OPSET = 20

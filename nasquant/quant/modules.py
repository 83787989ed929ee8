"""ModelOpt quantized versions of YOLO-NAS blocks beyond the conv layers ModelOpt already knows.

A YOLO-NAS bottleneck returns ``alpha * x + cv2(cv1(x))``. Quantizing only conv inputs leaves both
operands of that Add in floating point, so every ``cv2`` (a 3x3 conv, a third of the network's
compute) and the 1x1 conv feeding the first bottleneck of a stage produce float tensors that no
integer runtime can keep in int8. :class:`QuantBottleneck` adds the two quantizers that TensorRT's
explicit-quantization guide and ONNX Runtime's QLinearAdd both ask for: one on the residual input
(it observes the same tensor as ``cv1``'s input quantizer, hence calibrates to the same range) and
one on the branch output. This module imports ModelOpt; :mod:`nasquant.quant.calibrate` loads it
lazily.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.conversion import register
from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
from modelopt.torch.quantization.nn.modules.quant_module import QuantModule

from nasquant.models.yolo_nas import Bottleneck

#: names of the activation quantizers the YOLO-NAS blocks below add (matched by the quant config)
BLOCK_QUANTIZERS = ("residual_quantizer", "branch_quantizer")


class QuantBottleneck(QuantModule):
    """``alpha * Q(x) + Q(cv2(cv1(x)))``: a residual Add whose operands are both int8."""

    residual_quantizer: TensorQuantizer
    branch_quantizer: TensorQuantizer

    def _setup(self) -> None:
        for name in BLOCK_QUANTIZERS:
            self._register_temp_attribute(
                name, TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.residual_quantizer(x) + self.branch_quantizer(self.cv2(self.cv1(x)))


def register_block_quantizers() -> None:
    """Teach ModelOpt the YOLO-NAS blocks above (idempotent: ModelOpt's registry is process-wide)."""
    if Bottleneck not in QuantModuleRegistry:
        register(original_cls=Bottleneck, quantized_cls=QuantBottleneck)

"""keye: kernels, model and training for Kwai's Keye-VL-2.0-30B-A3B.

The CUDA kernels live in a torch extension (``keye/_C*.so``) that registers ``torch.ops.keye.*``;
every op also has a pure-PyTorch reference (``keye.ops.reference``) that is its specification and
what runs where the kernels are not built or the inputs are not on a CUDA device.
"""

__version__ = "0.1.0"

from keye import ops
from keye._extension import kernels_available, kernels_unavailable_reason

__all__ = ["ops", "kernels_available", "kernels_unavailable_reason", "__version__"]

"""The closed choices a config takes (dtypes, devices, alignments, flex backends, the default
baseline), defined once and importable without torch: config validates against them, the CLI
offers them."""

from __future__ import annotations

AUTO = "auto"  # a choice the config resolves per device
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
DEVICES = ("cpu", "cuda")
ALIGNS = ("end", "start")  # queries aligned with the end of the keys (decoding) or their start
FLEX_BACKENDS = (AUTO, "triton", "flash", "triton_decode")  # kernel_options BACKEND, lower
DEFAULT_BASELINE = "sdpa"  # baselines.REGISTRY holds it

"""One router launch at 65K tokens (E=128, top-8, bf16) for ncu:
    ncu --clock-control none -k regex:router_kernel -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats python3 bench/profile_router.py"""
import torch

import keye  # noqa: F401  (loads the extension)

logits = torch.randn(65536, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    torch.ops.keye.moe_router(logits, 8, True)
torch.cuda.synchronize()

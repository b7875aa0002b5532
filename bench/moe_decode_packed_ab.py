"""MoE decode over gate_up in the checkpoint's order against gate_up packed (keye.ops.moe_pack_gate_up), H200:

    python bench/moe_decode_packed_ab.py

Per layer in a CUDA graph of 8 layers with their own weights and routings (how a decode step runs), both graphs
replayed round-robin with L2 flushes; the outputs are compared bitwise first (the decode kernels sum in the same
order over either layout).
"""

import torch

from keye import ops
from keye.bench.moe_gemm import _setup
from keye.bench.timing import capture_graph, median_ms_interleaved

K = 8
CASES = [(2048, 768, 128, T) for T in (1, 2, 4, 8)] + [(2048, 1408, 64, T) for T in (1, 2, 4)]  # H, I, E, tokens


def layer_call(layer, packed_w1, packed: bool):
    x, weights, ids, w1, w2 = layer
    return lambda: ops.moe(x, weights, ids, packed_w1 if packed else w1, w2, gate_up_packed=packed)


def main() -> None:
    dev = torch.device("cuda")
    with torch.no_grad(), ops.index_checks(False):
        for H, I, E, T in CASES:
            layers = [_setup(T, H, I, E, K, dev) for _ in range(8)]
            packed_w1 = [ops.moe_pack_gate_up(layer[3]) for layer in layers]
            calls = {p: [layer_call(layer, w, p) for layer, w in zip(layers, packed_w1)] for p in (False, True)}
            same = all(torch.equal(a(), b()) for a, b in zip(calls[False], calls[True]))
            graphs = {p: capture_graph(*calls[p]) for p in (False, True)}
            ms = median_ms_interleaved({"plain": graphs[False].replay, "packed": graphs[True].replay}, dev, 50)
            print(f"{H}/{I}/{E} T {T}: bitwise equal {same}; per layer in a graph of 8: plain "
                  f"{ms['plain'] * 1e3 / 8:.1f} us, packed {ms['packed'] * 1e3 / 8:.1f} us", flush=True)
            del layers, packed_w1, calls, graphs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

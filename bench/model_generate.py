"""End-to-end generation with the full Keye-VL-2.0-30B-A3B configuration and random bf16 weights.

    python bench/model_generate.py long 262144          # one ~256K-token prompt: prefill time, decode tok/s,
                                                        # peak memory against keye.model.plan_memory
    python bench/model_generate.py decode 131072x1 8192x16   # prefill + 64 decode steps per context x batch,
                                                             # eager and replayed from CUDA graphs
    python bench/model_generate.py prefill-ab 32768     # prefill time with gate_up in the checkpoint's order and
                                                        # packed (KeyeVL.pack_experts), alternated, three rounds each
    python bench/model_generate.py --tiny --device cpu long 300   # smoke run of this script on the tiny config

Random weights (normal(0, 0.02), norms 1) exercise every kernel with the released shapes; the numbers say nothing
about output quality. Index checks are off (trusted inputs, no host syncs inside the ops).
"""

from __future__ import annotations

import argparse
import time

import torch

import keye.ops
from keye.model import GenerationRequest, KeyeVL, PagedKVCache, generate, keye_vl_2_30b_a3b, plan_memory, tiny_config


def random_model(config, device: str) -> KeyeVL:
    """The model built on the meta device, materialised on `device` in bf16 with random weights."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = KeyeVL(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompt(tokens: int, config, seed: int) -> list[int]:
    """Random text token ids (below every vision and stop token id)."""
    special = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id, *config.eos_token_ids]
    return torch.randint(0, min(special), (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def long_context(model, config, device: str, tokens: int, new: int = 128) -> None:
    plan = plan_memory(config, tokens + new)
    print("plan:", plan.summary(), flush=True)
    cache = PagedKVCache(config, plan.cache_pages, dtype=torch.bfloat16, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def stream(_i, _tok):
        _sync(device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    with keye.ops.index_checks(False):
        res = generate(model, [GenerationRequest(_prompt(tokens, config, 1), max_new_tokens=new,
                                                 stop_token_ids=[])], cache=cache, prefill_chunk=8192, stream=stream)[0]
    steps = len(res.tokens) - 1
    print(f"prefill {tokens} tokens + first token: {stamps[0] - t0:.1f} s; decode {steps} tokens: "
          f"{stamps[-1] - stamps[0]:.2f} s ({steps / max(stamps[-1] - stamps[0], 1e-9):.1f} tok/s)")
    if device.startswith("cuda"):
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 1e9:.2f} GB, reserved "
              f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB; plan {plan.total_bytes / 1e9:.2f} GB of "
              f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.2f} GB")


def decode_rates(model, config, device: str, shapes: list[tuple[int, int]], new: int = 64) -> None:
    for ctx, batch in shapes:
        cache = PagedKVCache.for_tokens(config, [ctx + new] * batch, dtype=torch.bfloat16, device=device)
        reqs = [GenerationRequest(_prompt(ctx, config, i), max_new_tokens=new, stop_token_ids=[])
                for i in range(batch)]
        for graphs in ((False, True) if device.startswith("cuda") else (False,)):
            stamps = []

            def stream(i, _tok):
                if i == batch - 1:
                    _sync(device)
                    stamps.append(time.perf_counter())

            t0 = time.perf_counter()
            with keye.ops.index_checks(False):
                generate(model, reqs, cache=cache, stream=stream, cuda_graphs=graphs)
            dt = stamps[-1] - stamps[0]
            print(f"context {ctx} x batch {batch}, CUDA graphs {graphs}: prefill + first token {stamps[0] - t0:.1f} s; "
                  f"{new - 1} decode steps {dt:.2f} s = {batch * (new - 1) / dt:.1f} tok/s")
        del cache
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def prefill_ab(model, config, device: str, tokens: int, rounds: int = 3) -> None:
    """Prefill (chunks of 8192, one new token) of the same prompt with experts unpacked / packed, alternated."""
    cache = PagedKVCache.for_tokens(config, [tokens + 1], dtype=torch.bfloat16, device=device)
    req = GenerationRequest(_prompt(tokens, config, 1), max_new_tokens=1, stop_token_ids=[])
    times = {False: [], True: []}
    for _ in range(rounds):
        for packed in (False, True):
            model.pack_experts() if packed else model.unpack_experts()
            _sync(device)
            t0 = time.perf_counter()
            with keye.ops.index_checks(False):
                generate(model, [req], cache=cache, prefill_chunk=8192)
            _sync(device)
            times[packed].append(time.perf_counter() - t0)
    model.unpack_experts()
    for packed, ts in times.items():
        print(f"prefill {tokens} tokens, experts {'packed' if packed else 'in checkpoint order'}: "
              + ", ".join(f"{t:.3f}" for t in ts) + " s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration instead of 30B-A3B")
    parser.add_argument("--device", default="cuda")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("long").add_argument("tokens", type=int)
    sub.add_parser("decode").add_argument("shapes", nargs="+", help="CONTEXTxBATCH, e.g. 131072x1")
    sub.add_parser("prefill-ab").add_argument("tokens", type=int)
    args = parser.parse_args()
    config = tiny_config(moe_intermediate_size=128) if args.tiny else keye_vl_2_30b_a3b()  # 2I packable
    t = time.perf_counter()
    model = random_model(config, args.device)
    _sync(args.device)
    print(f"random weights on {args.device} in {time.perf_counter() - t:.1f} s", flush=True)
    if args.what == "long":
        long_context(model, config, args.device, args.tokens)
    elif args.what == "prefill-ab":
        prefill_ab(model, config, args.device, args.tokens)
    else:
        decode_rates(model, config, args.device, [tuple(int(v) for v in s.split("x")) for s in args.shapes])


if __name__ == "__main__":
    main()

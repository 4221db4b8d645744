"""Which SDPA backends survive a FLUX-shaped attention backward on this GPU (issue 25's crash).

The rank allocation's sensitivity pass runs whole-model backward passes; on an H100 (torch 2.11)
one died with ``CUDA error: an illegal memory access``. This probe runs the attention backward of
a FLUX.1-dev block (24 heads × 4608 tokens × 128, bf16) once per backend, each in its own process
(a fault poisons the CUDA context) with ``CUDA_LAUNCH_BLOCKING=1``, and compares the gradients
with the math backend's.

Usage: ``python benchmarks/sdpa_backward_probe.py [--tokens 4608] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


def _child(backend: str, tokens: int) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 24, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    w = torch.randn(1, 24, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def grads(b: SDPBackend) -> list[torch.Tensor]:
        with sdpa_kernel([b]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return list(torch.autograd.grad((out * w).sum(), (q, k, v)))

    got = grads(getattr(SDPBackend, backend))
    torch.cuda.synchronize()
    ref = grads(SDPBackend.MATH)
    err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, ref))
    nan = any(bool(t.isnan().any()) for t in got)
    print(json.dumps({"backend": backend, "ok": True, "rel_err_vs_math": err, "nan": nan}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.tokens)
        return 0
    rows = []
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for backend in BACKENDS:
        p = subprocess.run([sys.executable, __file__, "--child", backend, "--tokens", str(args.tokens)],
                           capture_output=True, text=True, env=env, timeout=120)
        line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
        row = json.loads(line) if line else {"backend": backend, "ok": False,
                                              "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        rows.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

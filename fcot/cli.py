"""The ``fcot`` command line: ``fcot --help``.

``fcot demo`` is the main job on an embedded default (no downloads): random InternVL-shaped
ViT tokens go through ``shuffle_merge_norm`` on every backend that can run here, each result
is checked against the fp32 reference, and a table of backend, max error and time is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        # Triton reads this when it is first imported: set it before any kernel module loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fcot_kernels as fk
    from fcot_kernels.reference import shuffle_merge_norm_ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    grid, c = (32, 32), args.channels
    torch.manual_seed(args.seed)
    x = (torch.randn(args.tiles, grid[0] * grid[1], c, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(4 * c, device=device)).requires_grad_()
    b = (0.5 * torch.randn(4 * c, device=device)).requires_grad_()
    kw = dict(grid=grid, weight=w, bias=b, scale=0.5, merge=args.merge)
    print(f"shuffle_merge_norm on {device}: {args.tiles} tiles x {grid[0]}x{grid[1]} ViT tokens x C={c} ({args.dtype}), "
          f"merge={args.merge} -> {args.tiles} x {grid[0] * grid[1] // 4 // args.merge} tokens x {4 * c}")

    xe, we, be = (t.detach().float().requires_grad_() for t in (x, w, b))
    exact = shuffle_merge_norm_ref(xe, **{**kw, "weight": we, "bias": be})
    dy = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, (xe, we, be), dy)
    tol = 1e-3 if dtype == torch.float32 else 0.25

    print(f"\n{'backend':<10}{'status':<8}{'max |err| out':>15}{'max |err| grads':>17}{'fwd+bwd ms':>12}  note")
    failed = False
    for name, status in fk.backends().items():
        if not status.available or (name == "cuda" and device.type != "cuda"):
            print(f"{name:<10}{'n/a':<8}{'-':>15}{'-':>17}{'-':>12}  {status.reason}")
            continue
        t0 = time.perf_counter()
        with fk.poison_outputs():
            out = fk.shuffle_merge_norm(x, backend=name, **kw)
            grads = torch.autograd.grad(out, (x, w, b), dy.to(out.dtype))
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        err = (out.float() - exact).abs().max().item()
        gerr = max((g.float() - e).abs().max().item() for g, e in zip(grads, exact_grads))
        ok = err <= tol and gerr <= tol * max(1.0, max(e.abs().max().item() for e in exact_grads))
        failed |= not ok
        note = status.reason + (" (interpreter: time is not a kernel timing)" if name == "triton" and device.type == "cpu" else "")
        print(f"{name:<10}{'ok' if ok else 'FAIL':<8}{err:>15.2e}{gerr:>17.2e}{ms:>12.1f}  {note}")
    print("\nall backends match the fp32 reference" if not failed else "\nMISMATCH against the reference")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcot", description="fcot-vl: FCoT-VL visual-token compression, kernel-accelerated")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run shuffle_merge_norm on every available backend and check it against the reference")
    demo.add_argument("--tiles", type=int, default=2, help="448px tiles (default 2; 13 = one document image)")
    demo.add_argument("--channels", type=int, default=1024, help="ViT width C (1024 InternViT-300M, 3200 InternViT-6B)")
    demo.add_argument("--merge", type=int, default=2, choices=(1, 2, 4), help="tokens merged per output token")
    demo.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

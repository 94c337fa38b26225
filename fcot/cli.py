"""The ``fcot`` command line: ``fcot --help``.

``fcot demo`` is the main job: the FCoT-VL method end to end on a tiny InternVL, offline, on
CPU (:mod:`fcot.demo`). ``fcot eval`` answers and scores a JSONL eval set (:mod:`fcot.eval.run`);
``fcot report RUN_DIR`` draws the plots and the markdown summary of a run (:mod:`fcot.report`).
``fcot kernels-check``: random InternVL-shaped ViT tokens go through ``shuffle_merge_norm`` on
every backend that can run here, each checked against the fp32 reference.
``fcot data synth`` writes synthetic text-rich documents with QA pairs (``fcot.data.synth``);
``fcot merge`` averages checkpoints (``fcot.train.merge``); ``fcot distill`` and ``fcot posttrain``
train (``fcot.train.distill``, ``fcot.train.posttrain``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _kernels_check(args: argparse.Namespace) -> int:
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


def _synth(args: argparse.Namespace) -> int:
    from fcot.data.synth import PRESETS, SynthConfig, synthesize

    knobs = {k: getattr(args, k) for k in ("width", "height", "font_size", "density")}
    settings = {**(PRESETS[args.preset] if args.preset else {}), **{k: v for k, v in knobs.items() if v is not None}}
    cfg = SynthConfig(n=args.n, seed=args.seed, kinds=tuple(args.kinds), qa_per_image=args.qa_per_image, cot=args.cot,
                      **settings)
    summary = synthesize(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    per_token = summary["chars_per_visual_token"]
    print(f"wrote {summary['records']} records to {args.out}/data.jsonl ({summary['kinds']}); "
          f"{summary['tiles_per_image']} tiles and {summary['chars_per_image']} characters per image; "
          f"characters per visual token at 256/128/64 tokens per tile: {per_token['256']}/{per_token['128']}/{per_token['64']}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from fcot.train.merge import merge_checkpoints

    out = merge_checkpoints(args.out, args.checkpoints, args.weights, overwrite=args.overwrite)
    print(f"merged {len(args.checkpoints)} checkpoints into {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fcot.train.config import config_from_args

    cfg = config_from_args(args.command, args)
    if args.command == "distill":
        from fcot.train.distill import run_distill as run
    else:
        from fcot.train.posttrain import run_posttrain as run
    from fcot.train.engine import finish_distributed

    trainer = run(cfg, resume=args.resume)
    finish_distributed()
    print(f"fcot {args.command}: {trainer.state.global_step} steps; model saved to {cfg.common.output_dir} "
          f"(load it with fcot.load_compressed); metrics in {cfg.common.output_dir}/metrics.jsonl")
    return 0


def _add_train(sub) -> None:
    from fcot.train.config import add_config_arguments

    helps = {
        "distill": ("stage 1: re-align the compressed model to the uncompressed one by self-distillation",
                    "Trains the compressor and the student projector (ViT and LLM frozen) on KL(teacher || student) "
                    "over the answer tokens. --model tiny builds a tiny random InternVL (tests, demo)."),
        "posttrain": ("stage 2: fine-tune the compressed model (compressor, projector, LLM) on the answer tokens",
                      "--model may be a stage-1 output folder (loaded with fcot.load_compressed)."),
    }
    for name, (short, desc) in helps.items():
        p = sub.add_parser(name, help=short, description=desc + " Options come from --config (YAML: common, data, "
                           f"{name}, training), then --set, then the flags below.")
        add_config_arguments(p)
        p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
        p.set_defaults(run=_train)


def _add_data(sub) -> None:
    from fcot.data.synth import KINDS, PRESETS

    data = sub.add_parser("data", help="training data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="render synthetic text-rich documents (grids, tables, bar charts, receipts) with QA pairs",
                        description="Writes OUT/data.jsonl (InternVL conversation records), OUT/images/*.png and "
                                    "OUT/synth.json; the same options and seed give byte-identical output.")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--n", type=int, required=True, help="number of images/records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), help="dense: 896px pages in 10px print, where dropping 75%% of the "
                   "visual tokens loses text; sparse: one 448px tile in large print. Explicit flags override it.")
    p.add_argument("--width", type=int, help="image width in pixels (default 896)")
    p.add_argument("--height", type=int, help="image height in pixels (default 896)")
    p.add_argument("--font-size", type=int, help="font height in pixels (default 12)")
    p.add_argument("--density", type=float, help="fraction of the page filled with text, in (0, 1] (default 0.7)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="kinds of page to draw")
    p.add_argument("--qa-per-image", type=int, default=2, help="question-answer turns per image")
    p.add_argument("--cot", action="store_true", help="answer with a short rationale, then 'Answer: ...'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_synth)


def _eval(args: argparse.Namespace) -> int:
    from fcot.eval.run import EvalSetError, format_table, evaluate, load_eval_set, score_predictions

    if args.predictions:
        if args.models:
            raise ValueError("give either MODEL folders or --predictions, not both")
        preds = {}
        with open(args.predictions, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("prediction"), str):
                        raise EvalSetError(f"{args.predictions}:{n}: expected {{'id': str, 'prediction': str}}")
                    preds[row["id"]] = row["prediction"]
        means, _ = score_predictions(load_eval_set(args.eval_set)[:args.limit], preds)
        print("  ".join(f"{k}={100 * v:.2f}%" for k, v in means.items()))
        return 0
    if not args.models:
        raise ValueError("give at least one MODEL folder (or --predictions FILE)")
    if args.ratio is not None and not args.compressor:
        import warnings

        warnings.warn("--ratio has no effect without --compressor (it sets the training-free compression ratio)", stacklevel=1)
    results = evaluate(args.models, args.eval_set, compressors=args.compressor or (), ratios=args.ratio or [0.5], names=args.name,
                       limit=args.limit, out=args.out, device=args.device, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, max_tiles=args.max_tiles, progress=not args.quiet)
    print(format_table(results))
    if args.out:
        print(f"wrote {args.out}/eval.json and {args.out}/predictions/")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fcot.report import write_report

    path = write_report(args.run_dir, metric=args.metric)
    print(f"report: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fcot.demo import run_demo

    return run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)


def _add_eval(sub) -> None:
    from fcot.compress import COMPRESSORS

    p = sub.add_parser("eval", help="answer a JSONL eval set with generate and score it (EM, ANLS, relaxed, VQA acc)",
                       description="Each MODEL is a transformers-native InternVL folder: a compressed one (config.fcot, "
                                   "loaded with fcot.load_compressed) or a plain one (the teacher; with --compressor also "
                                   "evaluated training-free at each --ratio). Prints a table; --out writes eval.json and "
                                   "per-model predictions.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders")
    p.add_argument("--eval-set", required=True, help="records JSONL (fcot.data.records format; answers from the gpt turns "
                   "or an 'answers' list)")
    p.add_argument("--compressor", nargs="+", choices=sorted(COMPRESSORS), help="training-free compressors for plain models")
    p.add_argument("--ratio", nargs="+", type=float, help="fractions of visual tokens removed, with --compressor (default 0.5)")
    p.add_argument("--name", nargs="+", help="one display name per MODEL (default: folder names)")
    p.add_argument("--predictions", help="score a JSONL of {'id', 'prediction'} instead of running models")
    p.add_argument("--out", help="folder for eval.json and predictions/")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-tiles", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_eval)


def _add_report(sub) -> None:
    from fcot.eval.metrics import METRICS

    p = sub.add_parser("report", help="plots + markdown summary of a run folder, from its JSON files only",
                       description="Reads RUN_DIR's eval.json and metrics.jsonl files; writes RUN_DIR/report/ "
                                   "(loss.png, accuracy_vs_tokens.png, latency.png, report.md).")
    p.add_argument("run_dir", help="a run folder (e.g. what fcot demo wrote)")
    p.add_argument("--metric", default="exact_match", choices=sorted(METRICS), help="metric on the accuracy plot")
    p.set_defaults(run=_report)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="weighted average of several checkpoints (safetensors in and out)",
                       description="Averages the tensors of CKPT folders (same keys, shapes and dtypes; checked first) "
                                   "in fp32 and writes them in their dtype to OUT, with the first checkpoint's config "
                                   "and other files.")
    p.add_argument("out", help="output checkpoint folder (refused if it exists, unless --overwrite)")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders (two or more)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per checkpoint, normalised to sum "
                   "to 1 (default: equal)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the merge is complete")
    p.set_defaults(run=_merge)


def _bench_main(argv: list[str]) -> int:
    """``fcot bench ...`` runs ``python -m bench ...`` from the source checkout: the benchmarks live
    in the repository's bench/ folder, which imports fcot (never the other way round)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").is_file():
        print("fcot bench: the benchmarks live in the repository's bench/ folder, which this install does not "
              "include; run it from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fcot", description="fcot-vl: FCoT-VL visual-token compression, kernel-accelerated")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="every kernel and end-to-end benchmark in one run, with provenance, ceilings and peers; "
                   "'fcot bench report' renders plots and docs/performance.md (fcot bench --help)")
    demo = sub.add_parser("demo", help="FCoT-VL end to end on a tiny InternVL (CPU, offline, minutes): teacher, "
                          "training-free compressors, distilled students, report")
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a few steps of each stage (seconds; for tests/CI)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    kc = sub.add_parser("kernels-check", help="run shuffle_merge_norm on every available backend and check it against the reference")
    demo = kc
    demo.add_argument("--tiles", type=int, default=2, help="448px tiles (default 2; 13 = one document image)")
    demo.add_argument("--channels", type=int, default=1024, help="ViT width C (1024 InternViT-300M, 3200 InternViT-6B)")
    demo.add_argument("--merge", type=int, default=2, choices=(1, 2, 4), help="tokens merged per output token")
    demo.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_kernels_check)
    _add_eval(sub)
    _add_report(sub)
    _add_data(sub)
    _add_merge(sub)
    _add_train(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # Bad input (a config, a checkpoint, a path): one line naming what to fix, no traceback.
        parser.exit(2, f"fcot {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

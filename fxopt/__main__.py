"""Command line: `python -m fxopt demo` (the main job), `python -m fxopt explain`, `python -m fxopt check` and
`python -m fxopt bench`."""
from __future__ import annotations

import argparse
import sys


def _explain(args):
    import torch

    import fxopt
    from fxopt.check import build

    model = build(args.model, None)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq))
    fxopt.explain(model, input_ids=ids, labels=ids)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fxopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Llama + LoRA as is and with fxopt, and compare")
    demo.add_argument("--size", choices=["tiny", "small", "dense"], default=None,
                      help="model size (default: tiny on CPU, the dense workload on a GPU)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 30 on CPU, 20 on GPU)")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ex = sub.add_parser("explain", help="print the match report for a model, without training")
    ex.add_argument("--model", required=True,
                    help="a transformers model type (e.g. falcon), config class name (LlamaConfig) or local path")
    ex.add_argument("--no-lora", dest="lora", action="store_false", help="do not add PEFT LoRA adapters")
    ex.add_argument("--seq", type=int, default=32)
    chk = sub.add_parser("check", help="train a tiny model of an architecture as is and with fxopt: equal?",
                         description=__import__("fxopt.check", fromlist=["_"]).__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    chk.add_argument("--model", required=True,
                     help="a transformers model type (e.g. falcon), config class name (LlamaConfig) or local path")
    chk.add_argument("--steps", type=int, default=3)
    chk.add_argument("--seq", type=int, default=32)
    chk.add_argument("--attn", choices=["sdpa", "eager"], default=None, help="attention implementation")
    chk.add_argument("--device", choices=["cpu", "cuda"], default=None)
    from fxopt import bench as _bench  # stdlib only at import: --help stays fast

    bench = sub.add_parser("bench", help="benchmark training steps: eager, torch.compile, Liger-Kernel, fxopt",
                           description=_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fxopt.demo import run_demo

        run_demo(args.size, args.steps, args.device)
    elif args.command == "explain":
        _explain(args)
    elif args.command == "check":
        from fxopt.check import run_check

        return 0 if run_check(args.model, args.steps, args.seq, args.attn, device=args.device) else 1
    elif args.command == "bench":
        return _bench.run(args, bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())

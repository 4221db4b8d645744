"""``svdq lora`` (LoRA → converted delta file) and ``svdq extract-lora`` (dense diff → LoRA)."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _lora_arg(text: str) -> tuple[str, float]:
    path, sep, strength = text.rpartition(":")
    if sep and path and not path.endswith(("/", "\\")):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def _cmd_lora(args: argparse.Namespace) -> int:
    from svdq_format.errors import LoRAError
    from svdq_format.lora import base_fingerprint, compose_plans
    from svdq_format.outputs import check_output
    from svdq_format.pretrained import load_model_dir

    from .delta import file_sha256, save_delta
    from .load import check_report, convert_lora

    check_output(args.out, [args.base, *(_lora_arg(item)[0] for item in args.loras)], directory=False)
    model = load_model_dir(args.base)
    plans, strengths, sources, reports = [], [], [], []
    for i, item in enumerate(args.loras):
        src, strength = _lora_arg(item)
        plan, report = convert_lora(model, src, adapter_name=f"lora{i}", weight_name=args.weight_name)
        check_report(report, strict=not args.no_strict)
        plans.append(plan)
        strengths.append(strength)
        reports.append(report)
        try:
            digest = file_sha256(src)
        except OSError:
            digest = None
        sources.append({"source": src, "strength": strength, "format": report.format, "sha256": digest})
        print(report)
    name = args.name or "default"
    plan = plans[0] if len(plans) == 1 and strengths[0] == 1.0 else compose_plans(plans, strengths, name=name)
    plan.adapter = name
    if not plan.layers and not plan.params:
        raise LoRAError("nothing to write: no LoRA target matched")
    fp = base_fingerprint(model)
    save_delta(plan, args.out, base_fingerprint=fp, info={
        "source": ", ".join(str(s["source"]) for s in sources), "sources": sources,
        "format": "delta", "skipped": sorted({k for r in reports for k in r.skipped}), "base": str(args.base),
    })
    rank = sum(d.down.shape[0] for d in plan.layers.values())
    print(f"wrote {args.out}: {len(plan.layers)} layers, total added rank {rank}, base fingerprint {fp}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from .extract import extract_lora

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    report = extract_lora(args.base, args.tuned, rank=args.rank, out=args.out, dtype=dtype, exact=args.exact,
                          prefix=args.prefix)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        worst = sorted(report.layers.items(), key=lambda kv: kv[1])[:5]
        print(f"wrote {args.out}: rank {args.rank}, {len(report.layers)} layers, "
              f"captured energy {100 * report.captured_fraction:.2f}%")
        for name, frac in worst:
            print(f"  lowest: {name}: {100 * frac:.2f}%")
        if report.not_captured:
            print(f"  not expressible as LoRA ({len(report.not_captured)} tensors, e.g. biases/norms): "
                  + ", ".join(report.not_captured[:5]))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lora`` and ``extract-lora`` to the ``svdq`` parser."""
    p = subparsers.add_parser("lora", help="convert LoRAs for a quantized base into a delta file (instant load)")
    p.add_argument("base", help="quantized model directory (svdq_format.model.save_model_dir)")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]",
                   help="LoRA file / directory / Hub repo, optional strength folded in (several: composed)")
    p.add_argument("--out", required=True, help="output delta .safetensors")
    p.add_argument("--name", help="adapter name stored in the delta (default: 'default')")
    p.add_argument("--weight-name", help="file inside a LoRA directory/repo holding several")
    p.add_argument("--no-strict", action="store_true", help="ignore LoRA keys that match no layer")
    p.set_defaults(func=_cmd_lora)

    p = subparsers.add_parser("extract-lora", help="SVD of (tuned - base) dense weights into a LoRA (PEFT format)")
    p.add_argument("base", help="dense base weights: .safetensors file or directory")
    p.add_argument("tuned", help="dense fine-tuned weights with the same tensor names")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank")
    p.add_argument("--out", required=True, help="output LoRA .safetensors (diffusers/PEFT keys)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written LoRA factors (default bfloat16)")
    p.add_argument("--prefix", default="transformer.", help="key prefix (default 'transformer.')")
    p.add_argument("--exact", action="store_true", help="full SVD instead of randomised SVD")
    p.add_argument("--json", action="store_true", help="print the energy report as JSON")
    p.set_defaults(func=_cmd_extract)

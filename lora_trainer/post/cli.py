"""CLI subcommands of the post-training tools (added to ``python -m lora_trainer``), with sd-scripts'
flag names:

    resize  --model IN --save_to OUT --new_rank 32 [--dynamic_method sv_fro --dynamic_param 0.9] [--save_precision bf16]
    check   FILE
    merge   --model CKPT --loras A.safetensors:0.8 B.safetensors:0.5 --save_to OUT
    extract --model_org BASE --model_tuned TUNED --save_to OUT --dim 8 [--conv_dim 4]
    combine --loras A.safetensors:1 B.safetensors:0.5 --save_to OUT [--new_rank N]

Each prints its report and returns 0; a UserError reaches the main CLI, which prints it and returns 2.
"""
from __future__ import annotations

PRECISIONS = ["float", "fp16", "bf16"]


def _device(p) -> None:
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")


def _print(lines) -> None:
    for line in lines:
        print(line)


def cmd_resize(args) -> int:
    from .resize import resize_lora
    r = resize_lora(args.model, args.save_to, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                    dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param,
                    save_precision=args.save_precision, device=args.device, overwrite=args.overwrite)
    _print(r.lines(per_module=not args.quiet))
    return 0


def cmd_check(args) -> int:
    from .check import check_lora
    for i, path in enumerate(args.file):
        if i:
            print()
        _print(check_lora(path).lines(per_module=not args.quiet))
    return 0


def _loras(args):
    """``--loras A:0.8 B`` or sd-scripts' ``--models A B --ratios 0.8 1``."""
    from ..errors import UserError
    if args.models:
        if args.loras:
            raise UserError("Give the LoRAs either as --loras FILE:RATIO ... or as --models ... --ratios ..., not both.")
        ratios = args.ratios or [1.0] * len(args.models)
        if len(ratios) != len(args.models):
            raise UserError(f"{len(args.models)} --models but {len(ratios)} --ratios: give one ratio per model.")
        return list(zip(args.models, ratios))
    if args.ratios:
        raise UserError("--ratios goes with --models; with --loras write FILE:RATIO.")
    return args.loras or []


def _lora_args(p) -> None:
    p.add_argument("--loras", nargs="+", metavar="FILE[:RATIO]", help="LoRA files with ratios (default 1)")
    p.add_argument("--models", nargs="+", metavar="FILE", help="sd-scripts style: LoRA files (with --ratios)")
    p.add_argument("--ratios", nargs="+", type=float, metavar="RATIO", help="sd-scripts style: one ratio per --models")


def cmd_merge(args) -> int:
    from .merge import merge_lora_into_checkpoint
    r = merge_lora_into_checkpoint(args.model, _loras(args), args.save_to, save_precision=args.save_precision,
                                   device=args.device)
    _print(r.lines())
    return 0


def cmd_extract(args) -> int:
    from .extract import extract_lora
    r = extract_lora(args.model_org, args.model_tuned, args.save_to, dim=args.dim, conv_dim=args.conv_dim,
                     clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, save_precision=args.save_precision,
                     device=args.device, overwrite=args.overwrite)
    _print(r.lines(per_module=not args.quiet))
    return 0


def cmd_combine(args) -> int:
    from .combine import combine_loras
    r = combine_loras(_loras(args), args.save_to, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                      save_precision=args.save_precision, device=args.device, overwrite=args.overwrite)
    _print(r.lines(per_module=not args.quiet))
    return 0


def add_post_commands(sub) -> None:
    """Registers resize, check, merge, extract and combine on the main CLI's subparsers."""
    p = sub.add_parser("resize", help="lower a LoRA's rank by SVD (sd-scripts resize_lora)")
    p.add_argument("--model", required=True, help="the LoRA file to resize")
    p.add_argument("--save_to", required=True, help="the new file (.safetensors)")
    p.add_argument("--new_rank", type=int, default=4,
                   help="rank to keep (with a dynamic method: the most any module keeps); default 4, as sd-scripts")
    p.add_argument("--new_conv_rank", type=int, help="rank for conv modules (3x3 LoCon, and 1x1 as sd-scripts); "
                                                     "default new_rank")
    p.add_argument("--dynamic_method", choices=["sv_ratio", "sv_fro", "sv_cumulative"],
                   help="choose each module's rank as sd-scripts does (one singular value more than the target "
                        "needs): sv_fro keeps dynamic_param of the Frobenius norm, sv_cumulative of the sum of "
                        "singular values, sv_ratio those above max/dynamic_param")
    p.add_argument("--dynamic_param", type=float, help="the dynamic method's target, e.g. 0.9 (sv_fro) or 2 (sv_ratio)")
    p.add_argument("--save_precision", choices=PRECISIONS, help="default: the input's")
    p.add_argument("--overwrite", action="store_true", help="replace save_to if it exists (never the input)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only, no per-module lines")
    _device(p)
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("check", help="look for zero, NaN and Inf tensors in LoRA files, with a verdict")
    p.add_argument("file", nargs="+", help="LoRA file(s)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only, no per-module lines")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("merge", help="merge LoRAs into a checkpoint, written as a new file")
    p.add_argument("--model", "--sd_model", dest="model", required=True,
                   help="the checkpoint (.safetensors or .ckpt): SD1, SD2 or SDXL")
    _lora_args(p)
    p.add_argument("--save_to", required=True, help="the new checkpoint (.safetensors); never overwritten")
    p.add_argument("--save_precision", choices=PRECISIONS, help="default: the checkpoint's own dtypes")
    _device(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("extract", help="extract a LoRA from a fine-tuned checkpoint and its base (SVD)")
    p.add_argument("--model_org", required=True, help="the base checkpoint")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned checkpoint")
    p.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--dim", type=int, default=4, help="rank of linear and 1x1 conv modules (default 4)")
    p.add_argument("--conv_dim", type=int, help="rank of 3x3 conv modules (LoCon); default: none extracted")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp values at this quantile (1 = off)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="leave the text encoder out when its largest difference is at most this")
    p.add_argument("--save_precision", choices=PRECISIONS, default="float")
    p.add_argument("--overwrite", action="store_true", help="replace save_to if it exists (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only, no per-module lines")
    _device(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("combine", help="combine LoRAs with ratios into one LoRA")
    _lora_args(p)
    p.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--new_rank", type=int, help="re-factor each module to this rank by SVD (default: concatenate, exact)")
    p.add_argument("--new_conv_rank", type=int, help="rank for 3x3 conv modules with --new_rank; default new_rank")
    p.add_argument("--save_precision", choices=PRECISIONS, help="default: the first file's")
    p.add_argument("--overwrite", action="store_true", help="replace save_to if it exists (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only (default for combine)")
    p.add_argument("-v", "--per_module", dest="quiet", action="store_false", help="per-module lines")
    _device(p)
    p.set_defaults(func=cmd_combine, quiet=True)

"""The ``nucseg`` command line.

``predict`` runs the engine locally; ``up``, ``serve``, ``worker`` and ``redis`` run the service;
``submit``, ``status``, ``list``, ``cancel`` and ``download`` talk to a server (from the nucseg-client
package, the ``client`` extra; without it they print what to install and exit 2).

Exit codes: 0 success; 1 job failed; 2 bad usage or configuration; 3 for ``predict`` an unreadable
or unsupported slide, for the server commands a server or connection error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from core.settings import get_settings
from model.options import BATCH_HELP, DEFAULTS, OUTPUT_GROUPS, STAIN_METHODS, Stats

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SLIDE = 0, 1, 2, 3


def _add_predict(subparsers: Any) -> None:
    settings = get_settings()
    p = subparsers.add_parser("predict", help="segment one slide locally (no server needed)")
    p.add_argument("slide", type=Path, help="slide or image file (svs, ndpi, mrxs, tiff, png, jpg, ...)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--model", default=settings.model, help="checkpoint (default: NUCSEG_MODEL or shipped model)")
    p.add_argument("--tile", type=int, default=DEFAULTS.tile_size, help="tile size in px (multiple of 32)")
    p.add_argument("--overlap", type=int, default=DEFAULTS.overlap, help="tile overlap in px")
    p.add_argument("--block", type=int, default=DEFAULTS.block_size, help="output block size in px")
    p.add_argument("--batch", type=int, default=DEFAULTS.batch_size, help=BATCH_HELP)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=settings.precision)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=settings.device)
    p.add_argument("--tissue", action=argparse.BooleanOptionalAction, default=DEFAULTS.tissue,
                   help="skip tiles without tissue (default: on for multi-level slides)")
    p.add_argument("--mpp", type=float, default=DEFAULTS.mpp, help="µm/px of level 0 when the slide does not say")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=DEFAULTS.tta,
                   help="average each tile over its four flips (about 4x the network's time)")
    p.add_argument("--stain", choices=STAIN_METHODS, default=DEFAULTS.stain,
                   help="normalise the slide's colours to the training images' first (see the model card)")
    groups = ",".join(OUTPUT_GROUPS)
    p.add_argument("--outputs", default=groups, help=f"comma list of {groups}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=DEFAULTS.workers,
                   help="nuclei post-processing processes (default: the cores given; 0: in this process)")
    p.add_argument("--json", action="store_true", help="print stats as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.checkpoint import load_model
    from model.engine import set_threads
    from model.errors import CheckpointError, OptionsError, SlideError
    from model.options import EngineOptions
    from model.pipeline import run_prediction

    settings = get_settings()
    outputs = frozenset(o.strip() for o in args.outputs.split(",") if o.strip())
    options = EngineOptions(tile_size=args.tile, overlap=args.overlap, block_size=args.block,
                            batch_size=args.batch, precision=args.precision, device=args.device,
                            tissue=args.tissue, mpp=args.mpp, workers=args.workers, tta=args.tta,
                            stain=args.stain)
    set_threads(args.threads)
    bar = tqdm(total=0, unit="block", disable=args.quiet, file=sys.stderr, desc=args.slide.name)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        model = load_model(args.model, expected_sha256=settings.model_sha256)
        stats = run_prediction(args.slide, args.out, model, options, outputs=outputs, on_progress=progress,
                               max_image_pixels=settings.max_image_pixels,
                               max_slide_pixels=settings.max_slide_pixels)
    except SlideError as exc:
        return _fail(EXIT_SLIDE, f"{exc.code}: {exc}", args.json)
    except (CheckpointError, OptionsError, ValueError) as exc:
        return _fail(EXIT_USAGE, f"{getattr(exc, 'code', 'invalid_options')}: {exc}", args.json)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        _print_summary(stats, args.out)
    return EXIT_OK


def _fail(code: int, message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": {"code": message.split(":")[0], "message": message}}))
    print(f"nucseg: error: {message}", file=sys.stderr)
    return code


def _print_summary(stats: Stats, out: Path) -> None:
    a = stats["analysis"]
    print(f"{stats['slide']['name']}: {a['width']}x{a['height']} px at {a['mpp']:.4f} µm/px, "
          f"{stats['tiles']['run']} tiles run, {stats['tiles']['skipped']} skipped, "
          f"{stats['timings_s'].get('total', 0):.1f} s on {stats['device']} ({stats['precision']})")
    held = (stats["model"].get("held_out") or {}).get("classes", {})
    for name, c in stats["semantic"]["classes"].items():
        frac = c["tissue_fraction"]
        iou = held.get(name, {}).get("iou")
        print(f"  {name:<11} {c['area_um2']:>14.1f} µm²  {100 * frac if frac is not None else 0:6.2f}% of tissue"
              + (f"  (held-out IoU {iou:.2f})" if iou is not None else ""))
    if "nuclei" in stats:
        counts = {k: v["count"] for k, v in stats["nuclei"].get("classes", {}).items()}
        print(f"  nuclei: {counts}")
    print(f"results in {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucseg", description="nucleus segmentation for H&E slides")
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_predict(subparsers)
    _add_service_commands(subparsers)
    _add_client_commands(subparsers)
    return parser


def _add_service_commands(subparsers: Any) -> None:
    from cli.service import add_service_commands

    add_service_commands(subparsers)


# The commands of the separate nucseg-client distribution (httpx + tqdm), which the images do not install.
CLIENT_COMMANDS = ("submit", "status", "list", "cancel", "download")
CLIENT_MISSING = "needs the nucseg-client package: pip install ./client (or pip install 'nucseg[client]')"


def _add_client_commands(subparsers: Any) -> None:
    """``submit``, ``status``, ``list``, ``cancel``, ``download``: talk to a server over HTTP.

    Without nucseg-client they still exist, and say what they need instead of vanishing."""
    try:
        from nucseg_client.cli import add_client_commands
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "nucseg_client":
            raise
        for name in CLIENT_COMMANDS:
            p = subparsers.add_parser(name, add_help=False, help=f"({CLIENT_MISSING})")
            p.add_argument("args", nargs=argparse.REMAINDER)
            p.set_defaults(func=_client_missing)
        return
    add_client_commands(subparsers)


def _client_missing(args: argparse.Namespace) -> int:
    print(f"nucseg {args.command}: {CLIENT_MISSING}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

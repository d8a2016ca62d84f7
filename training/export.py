"""Export a checkpoint to the release format: fp16 safetensors with the model card in its header.

``python -m training.export --checkpoint runs/default/best.pt --out model/weights/nucseg-default.safetensors
[--eval runs/eval/eval.json] [--set key=value ...]``

Also writes ``<out>.sha256`` (``sha256sum -c`` format) beside the file. Test metrics from an
``eval.json`` go into the card as ``test_metrics`` (evaluate the fp16 export itself, then export
again with ``--eval``: the weights, and so the metrics, are identical).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from model.card import ModelCard
from model.checkpoint import load_model, save_safetensors, sha256_file


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parse as JSON when they can, else stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def export_card(card: ModelCard, source_sha256: str, eval_path: Path | None,
                sets: dict[str, Any]) -> ModelCard:
    """The card with export provenance, optional test metrics, and overrides."""
    update: dict[str, Any] = {"exported_from_sha256": source_sha256, **sets}
    if eval_path is not None:
        report = json.loads(eval_path.read_text())
        update["test_metrics"] = {"datasets": report["datasets"], "targets": report["targets"],
                                  "engine": report["engine"]}
    return ModelCard.model_validate(card.model_dump() | update)


def export(checkpoint: Path, out: Path, *, eval_path: Path | None = None, sets: dict[str, Any] | None = None,
           fp16: bool = True) -> tuple[Path, str]:
    """Write the release file and its ``.sha256``; returns (path, sha256)."""
    loaded = load_model(checkpoint)
    card = export_card(loaded.card, loaded.sha256, eval_path, sets or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(loaded.network, card, out, fp16=fp16)
    digest = sha256_file(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    return out, digest


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--eval", type=Path, help="eval.json from training.evaluate, stored as test_metrics")
    p.add_argument("--set", action="append", default=[], help="card field key=value (JSON values allowed)")
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights (default fp16)")
    args = p.parse_args(argv)
    path, digest = export(args.checkpoint, args.out, eval_path=args.eval, sets=parse_sets(args.set),
                          fp16=not args.fp32)
    print(f"{path}  {path.stat().st_size / 1e6:.1f} MB  sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

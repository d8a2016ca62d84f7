"""Train the two-head U-Net: ``python -m training.train --config training/configs/<name>.yaml``.

AdamW with linear warmup and a cosine schedule (per step), seeded, resumable from
``<out_dir>/last.pt`` (automatic unless ``--fresh``), best checkpoint ``best.pt`` by
``train.best_metric``, and with ``train.ema`` an average of the weights, ``ema.pt``. Per-epoch logs:
``log.csv``, ``log.json``, ``dashboard.png``.

The cosine runs over ``progress = max(step / planned_steps, wall / time_budget_min)``: with a time
budget (for shared CPUs whose speed varies) the schedule completes, and training stops, when the
budget is spent, so results then depend on wall time; without one, runs are step-deterministic.
Changing ``train.epochs`` before a resume re-plans the remaining schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.card import ModelCard, Normalisation
from model.checkpoint import save_checkpoint
from model.device import emulation_warning, resolve_precision
from model.network import SEMANTIC_CLASSES, TERNARY_CLASSES, TwoHeadUnet
from training.average import WeightAverage
from training.config import SourceConfig, TrainConfig, load_config
from training.data.augment import AugmentConfig
from training.data.paste import PasteConfig
from training.data.patches import PatchConfig, PatchDataset, write_sampling
from training.data.sample import Sample, open_background, without_semantic
from training.data.sources import load_instance_folder, load_monusac, load_monuseg
from training.data.split import check_no_leak, split_by_group, split_record, write_split
from training.deepen import deepen
from training.logs import write_logs
from training.losses import LossConfig, TwoHeadLoss
from training.metrics import PixelMetrics
from training.pack import Pack


@dataclass
class State:
    """What survives a restart."""

    epoch: int = 0
    step: int = 0
    done: bool = False
    best: float = -math.inf
    wall_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    """``git rev-parse HEAD`` (with ``+dirty`` when the tree has changes), or ``"uncommitted"``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def load_source(src: SourceConfig, boundary_width: int, pack: Pack | None = None) -> list[Sample]:
    """Samples of one configured source, from its folder or from ``pack``."""
    if pack is not None:
        return pack.samples(src, boundary_width)
    if src.kind == "monuseg":
        return load_monuseg(src.root, boundary_width=boundary_width)
    if src.kind == "monusac":
        return load_monusac(src.root, boundary_width=boundary_width)
    assert src.class_map is not None
    return load_instance_folder(src.root, class_map=src.class_map, group_pattern=src.group_pattern,
                                dataset=src.label, boundary_width=boundary_width)


def load_data(cfg: TrainConfig, pack: Pack | None = None) -> tuple[list[Sample], list[float], list[Sample]]:
    """(train samples, their sampling weights, val samples), split per source by group."""
    train: list[Sample] = []
    weights: list[float] = []
    val: list[Sample] = []
    for src in cfg.data.sources:
        samples = load_source(src, cfg.data.boundary_width, pack)
        if not samples:
            raise FileNotFoundError(f"source {src.root!r} ({src.kind}) holds no samples")
        tr, va = split_samples(samples, src.label, cfg)
        if src.open_background:
            tr = [open_background(s) for s in tr]
        if not src.semantic:
            tr = [without_semantic(s) for s in tr]
        area = sum(s.semantic.size for s in tr)
        weights += [src.weight * s.semantic.size / area for s in tr]
        train += tr
        val += va
    check_no_leak(train, val)
    return train, weights, val


def split_samples(samples: list[Sample], label: str, cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, val) of one source: its configured validation groups, else a seeded fraction."""
    groups = cfg.data.val_groups.get(label)
    if groups is None:
        return split_by_group(samples, cfg.data.val_fraction, cfg.seed)
    unknown = sorted(set(groups) - {s.group for s in samples})
    if unknown:
        raise ValueError(f"data.val_groups[{label!r}] names groups that source has not: {unknown}")
    return [s for s in samples if s.group not in groups], [s for s in samples if s.group in groups]


def resolved(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``train.precision: auto`` made what runs on ``device`` (bf16 on CUDA and on CPUs
    with native bf16, else fp32), so the run's card records the precision it trained in."""
    if cfg.train.precision != "auto":
        return cfg
    train = cfg.train.model_copy(update={"precision": resolve_precision("auto", device)})
    return cfg.model_copy(update={"train": train})


def pick_device(cfg: TrainConfig) -> torch.device:
    """``auto`` means CUDA when available."""
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch.cuda.is_available() is False")
    return torch.device(cfg.train.device)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (CPU or CUDA), fp16 AMP (CUDA only), or nothing; ``cfg`` as ``resolved`` gives it."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.train.precision == "amp":
        if device.type != "cuda":
            raise ValueError(f"precision 'amp' needs CUDA, device is {device.type!r}; use 'bf16' on CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_card(cfg: TrainConfig, **training: Any) -> ModelCard:
    """The model card stored in every checkpoint."""
    c = cfg.card
    return ModelCard.model_validate({"name": c.name, "version": c.version, "encoder": cfg.encoder, "mpp": c.mpp,
                                     "tile_size": c.tile_size, "licence": c.licence, "notes": c.notes,
                                     "training": training})


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup_steps``, then cosine to ``min_ratio`` at progress 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class Trainer:
    """One training run; ``run()`` trains the remaining epochs."""

    def __init__(self, cfg: TrainConfig, *, config_path: str, fresh: bool = False,
                 quiet: bool = False, pack: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.commit = git_commit()  # what this process trains with, whatever lands while it runs
        self.quiet = quiet
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.seed)
        self.device = pick_device(cfg)
        self.cfg = cfg = resolved(cfg, self.device)
        self._log(f"device {self.device}, precision {cfg.train.precision}")
        warning = emulation_warning(cfg.train.precision, self.device)
        if warning:
            self._log(f"warning: {warning}")
        self.train_samples, weights, self.val_samples = load_data(cfg, Pack.open(pack) if pack else None)
        if pack:
            self._log(f"sources read from the pack {pack}")
        self.split = split_record(self.train_samples, self.val_samples)
        write_split(self.out / "split.json", self.split)
        self.dataset = self._dataset(weights)
        self.network = TwoHeadUnet(cfg.encoder).to(self.device)
        if cfg.train.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.loss = TwoHeadLoss(LossConfig(**cfg.loss.model_dump()))
        self.optim = torch.optim.AdamW(self.network.parameters(), lr=cfg.train.lr,
                                       weight_decay=cfg.train.weight_decay)
        self.steps_per_epoch = math.ceil(cfg.patches.per_epoch / cfg.train.batch_size)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "amp")
        self.state = State()
        self._epoch_start = time.perf_counter()
        resumed: dict[str, Any] = {}
        if not fresh and (self.out / "last.pt").is_file():
            resumed = self._resume(self.out / "last.pt")
        elif cfg.train.init_from:
            self._warm_start(cfg.train.init_from)
        self.average = self._average(resumed)
        write_sampling(self.out / "sampling.json", self.dataset)

    def _dataset(self, weights: list[float]) -> PatchDataset:
        p = self.cfg.patches
        pc = PatchConfig(size=p.size, per_epoch=p.per_epoch, foreground_bias=p.foreground_bias,
                         scale_jitter=p.scale_jitter, class_bias=p.class_bias, class_draw=p.class_draw,
                         rotate=p.rotate, paste=PasteConfig(**p.paste.model_dump()),
                         augment=AugmentConfig(**p.augment.model_dump()))
        return PatchDataset(self.train_samples, pc, seed=self.cfg.seed, weights=weights)

    def _warm_start(self, path: str) -> None:
        from model.checkpoint import load_model

        source = load_model(path).network
        if source.encoder_name == self.cfg.encoder:
            self.network.load_state_dict(source.state_dict())
            self._log(f"weights initialised from {path}")
            return
        extra = deepen(self.network, source.state_dict())
        self._log(f"weights initialised from {path} ({source.encoder_name} → {self.cfg.encoder}, "
                  f"{len(extra)} residual blocks start as identities)")

    def _average(self, resumed: dict[str, Any]) -> WeightAverage[TwoHeadUnet] | None:
        """The weight average, restored from the ``resumed`` checkpoint when it holds one, else starting
        at the network."""
        if self.cfg.train.ema is None:
            return None
        average = WeightAverage(self.network, self.cfg.train.ema)
        if resumed and not average.restore(resumed):
            self._log(f"the resumed checkpoint holds no weight average: it starts at step {self.state.step}")
        return average

    def _resume(self, path: Path) -> dict[str, Any]:
        """Restore network, optimiser and state from ``path``; returns the checkpoint."""
        blob: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(blob["model_state"])
        self.optim.load_state_dict(blob["optimizer_state"])
        self.scaler.load_state_dict(blob["scaler_state"])
        self.state = State(epoch=int(blob["epoch"]), step=int(blob["step"]), done=bool(blob["done"]),
                           best=float(blob["best"]), wall_s=float(blob["wall_s"]), history=list(blob["history"]))
        self._log(f"resumed from {path} at epoch {self.state.epoch}")
        return blob

    def _log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def run(self) -> State:
        """Train until ``train.epochs``; returns the final state."""
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            if self.state.done:
                break
            start = self._epoch_start = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optim.param_groups[0]["lr"]}
            row.update(self.train_epoch(epoch))
            if self._validate_now(epoch):
                row.update(self.validate())
            row["val_score"] = self._score(row)
            row["epoch_s"] = time.perf_counter() - start
            row["progress"] = self.progress()
            self.state.wall_s += row["epoch_s"]
            row["wall_s"] = self.state.wall_s
            self.state.epoch = epoch + 1
            self.state.history.append(row)
            self._checkpoint(row)
            write_logs(self.out, self.state.history, self.cfg.train.score_metrics)
            self._log(_short(row))
        return self.state

    def _validate_now(self, epoch: int) -> bool:
        """Every ``val_every`` epochs, and always at the last one or when the schedule is done."""
        last = epoch + 1 == self.cfg.train.epochs or self.state.done
        return last or (epoch + 1) % self.cfg.train.val_every == 0

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The epoch's patches, moved to the device."""
        self.dataset.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        cuda = self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_size=self.cfg.train.batch_size, shuffle=True, generator=gen,
                            num_workers=self.cfg.train.num_workers, drop_last=False, pin_memory=cuda)
        for x, sem, ter in loader:  # pinned on CUDA: copied while the last step still runs
            x = x.to(self.device, non_blocking=cuda)
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, sem.to(self.device, non_blocking=cuda), ter.to(self.device, non_blocking=cuda)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over ``per_epoch`` patches; mean losses and throughput."""
        self.network.train()
        sums = {"loss": 0.0, "sem": 0.0, "ter": 0.0}
        n, start = 0, time.perf_counter()
        total = math.ceil(self.cfg.patches.per_epoch / self.cfg.train.batch_size)
        bar = tqdm(self.batches(epoch), total=total, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   disable=self.quiet, mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        for x, sem, ter in bar:
            if self.progress() >= 1:
                self.state.done = True
                self._log(f"schedule complete (time budget or steps) at step {self.state.step}")
                break
            parts = self.step(x, sem, ter)
            for key in sums:
                sums[key] += parts[key] * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", refresh=False)
        dt = time.perf_counter() - start
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()} | {"patches_per_s": n / dt}

    def step(self, x: torch.Tensor, sem: torch.Tensor, ter: torch.Tensor) -> dict[str, float]:
        """One optimiser step."""
        t = self.cfg.train
        factor = lr_factor(self.state.step, self.progress(), int(t.warmup_epochs * self.steps_per_epoch),
                           t.min_lr_ratio)
        for group in self.optim.param_groups:
            group["lr"] = t.lr * factor
        self.optim.zero_grad(set_to_none=True)
        with autocast(self.cfg, self.device):
            sem_logits, ter_logits = self.network(x)
        loss, parts = self.loss(sem_logits.float(), ter_logits.float(), sem, ter)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optim)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optim)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.network)
        self.state.step += 1
        return parts

    def progress(self) -> float:
        """Fraction of the schedule done: by steps, or by wall time when a budget is set."""
        t = self.cfg.train
        by_steps = self.state.step / (self.steps_per_epoch * t.epochs)
        if not t.time_budget_min:
            return by_steps
        wall = self.state.wall_s + (time.perf_counter() - self._epoch_start)
        return max(by_steps, wall / (60 * t.time_budget_min))

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Whole-image validation per dataset; keys ``val_<dataset>_<metric>`` and ``val_loss``."""
        if not self.val_samples:
            return {}
        self.network.eval()
        per: dict[str, PixelMetrics] = {}
        losses = []
        for s in self.val_samples:
            sem_logits, ter_logits = predict_whole(self.network, s.image, self.device, self.cfg)
            sem_t = torch.from_numpy(s.semantic)[None]
            ter_t = torch.from_numpy(s.ternary)[None]
            losses.append(self.loss(sem_logits[None], ter_logits[None], sem_t, ter_t)[1]["loss"])
            m = per.setdefault(s.dataset, PixelMetrics(SEMANTIC_CLASSES, TERNARY_CLASSES))
            m.update(sem_logits.argmax(0).numpy(), ter_logits.argmax(0).numpy(), s.semantic, s.ternary)
        out = {"val_loss": float(np.mean(losses))}
        for name, m in per.items():
            out.update({f"val_{name}_{k}": v for k, v in m.summary().items()})
        return out

    def _score(self, row: dict[str, Any]) -> float:
        vals = [row.get(k, math.nan) for k in self.cfg.train.score_metrics]
        finite = [v for v in vals if isinstance(v, float) and math.isfinite(v)]
        if not finite:
            return math.nan if self.val_samples else -float(row["train_loss"])
        return float(np.mean(finite))

    def _checkpoint(self, row: dict[str, Any]) -> None:
        metric = float(row.get(self.cfg.train.best_metric, math.nan))
        improved = math.isfinite(metric) and metric > self.state.best
        if improved:
            self.state.best = metric
        card = self.card(row)
        extra = {"optimizer_state": self.optim.state_dict(), "step": self.state.step, "done": self.state.done,
                 "scaler_state": self.scaler.state_dict(), "epoch": self.state.epoch, "best": self.state.best,
                 "wall_s": self.state.wall_s, "history": self.state.history}
        if self.average is not None:
            extra |= self.average.state()
            avg = self.average
            ema_card = self.card({}, weights=f"exponential average, decay {avg.decay}, {avg.updates} updates")
            save_checkpoint(avg.network, ema_card, self.out / "ema.pt", epoch=self.state.epoch)
        net = self.network.to(memory_format=torch.contiguous_format)
        save_checkpoint(net, card, self.out / "last.pt", **extra)
        if improved:
            save_checkpoint(net, card, self.out / "best.pt", epoch=self.state.epoch)
        if self.cfg.train.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)

    def card(self, row: dict[str, Any], **more: Any) -> ModelCard:
        """Card with the provenance of this epoch (validation figures from ``row``)."""
        val = {k: v for k, v in row.items() if k.startswith("val_") and _finite(v)}
        return make_card(
            self.cfg, command=f"python -m training.train --config {shlex.quote(self.config_path)}",
            config=self.cfg.model_dump(mode="json"), git_commit=self.commit, split=self.split,
            epoch=self.state.epoch, epochs_planned=self.cfg.train.epochs, steps=self.state.step,
            patches_seen=self.state.step * self.cfg.train.batch_size, wall_s=round(self.state.wall_s, 1),
            val_metrics=val, best_metric=self.cfg.train.best_metric, **more)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _short(row: dict[str, Any]) -> str:
    keys = ("epoch", "train_loss", "val_loss", "val_score", "patches_per_s", "epoch_s")
    return " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


def predict_whole(network: TwoHeadUnet, image: np.ndarray, device: torch.device,
                  cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(C, H, W)`` (float32, CPU) of a whole image, reflect-padded to a multiple of 32."""
    h, w = image.shape[:2]
    ph, pw = (-h) % 32, (-w) % 32
    mean = np.asarray(cfg_mean(), dtype=np.float32) * 255
    std = np.asarray(cfg_std(), dtype=np.float32) * 255
    x = (np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect").astype(np.float32) - mean) / std
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None].to(device)
    if cfg.train.channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    with autocast(cfg, device):
        sem, ter = network(t)
    return sem[0, :, :h, :w].float().cpu(), ter[0, :, :h, :w].float().cpu()


def cfg_mean() -> tuple[float, float, float]:
    """Input normalisation mean (the card's default)."""
    return Normalisation().mean


def cfg_std() -> tuple[float, float, float]:
    """Input normalisation std (the card's default)."""
    return Normalisation().std


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (training/configs/*.yaml)")
    parser.add_argument("--fresh", action="store_true", help="ignore <out_dir>/last.pt and start over")
    parser.add_argument("--pack", help="read the sources from this training pack (training.pack), not their folders")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    trainer = Trainer(cfg, config_path=args.config, fresh=args.fresh, pack=args.pack)
    state = trainer.run()
    print(f"done: {state.epoch} epochs, best {cfg.train.best_metric}={state.best:.4f}, "
          f"wall {state.wall_s / 60:.1f} min, checkpoints in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One training loop for every model, driven by a recipe (YAML).

    quell train recipes/dtln/config.yaml [--out runs/dtln] [--max-minutes 60]

Data are endless synthesized mixtures (`quell.dns.synth`): item i of the run is `mixture(seed + i)`, so a run
that stops resumes from its last checkpoint with the same data order. Every epoch ends with a validation on a
fixed synthesized set (SI-SDR, PESQ-WB); the best checkpoint is kept, the learning rate halves when validation
stalls, and training stops early when it stalls for long. `torchrun --nproc_per_node N -m quell.models.train`
trains on several GPUs with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from quell.dns import metrics, mos
from quell.dns.corpora import load_corpus
from quell.dns.synth import EchoConfig, EchoSynthesizer, SynthConfig, Synthesizer
from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig
from quell.models.dtln import DTLN, DTLNConfig
from quell.models.losses import loss_with_args

log = logging.getLogger("quell.train")

# name -> (model class, its config dataclass); adding a model adds a line here
MODELS: dict[str, tuple[type[nn.Module], type]] = {"dtln": (DTLN, DTLNConfig), "d3net_aec": (D3NetAEC, D3NetAECConfig)}

# an example is (model inputs, targets): denoising ((noisy,), (clean,)); echo ((mic, reference), (near,
# mic without its echo)): the second target supervises the echo mask alone
Example = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]


@dataclass
class TrainConfig:
    """The `train:` section of a recipe."""

    batch_size: int = 16
    lr: float = 1e-3
    steps_per_epoch: int = 500
    max_epochs: int = 200
    loss: str = "neg_snr"
    loss_args: dict[str, float] | None = None  # keyword arguments of the loss (e.g. speech_loss_weight)
    grad_clip: float = 3.0
    lr_patience: int = 3
    lr_factor: float = 0.5
    early_stop_patience: int = 10
    seed: int = 1234
    threads: int = 1
    workers: int = 1
    valid_clips: int = 64
    valid_seed: int = 10_000_000
    selection_metric: str = "pesq_wb"  # best checkpoint, LR schedule and early stop follow this validation score
    valid_dnsmos: bool = False  # also DNSMOS SIG/BAK/OVRL of the validation outputs (needs quell[eval])
    valid_aecmos: bool = False  # echo models: also AECMOS echo and degradation, and their mean "aecmos"
    teacher: str | None = None  # distillation: a peer of quell.dns.baselines whose output is the target
    teacher_pool: int = 0  # with a teacher: items cycle over this many mixtures (0: never repeat)


def load_recipe(path: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """A recipe (YAML) and its `train:` section as a TrainConfig."""
    recipe = yaml.safe_load(Path(path).read_text())
    return recipe, _dataclass_from(TrainConfig, recipe.get("train"))


def run_folder(recipe_path: str | Path, out: str | Path | None = None) -> Path:
    """`out`, or by default runs/<the recipe's folder name>."""
    return Path(out) if out else Path("runs") / Path(recipe_path).parent.name


def build_model(recipe: dict[str, Any]) -> nn.Module:
    """The model a recipe names, with its `model_args`."""
    model_class, config_class = MODELS[recipe["model"]]
    return model_class(config_class(**recipe.get("model_args", {})))


def _dataclass_from(cls: type, values: dict[str, Any] | None) -> Any:
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys in recipe: {', '.join(sorted(unknown))}")
    for f in fields(cls):  # YAML lists -> tuples for range fields
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def _corpora(section: dict[str, Any], base: Path, rate: int) -> dict[str, Any]:
    """Corpora from a recipe data section: lists of folders (relative to the recipe) per key."""

    def corpus(key: str, min_seconds: float = 0.0):
        folders = section.get(key)
        if not folders:
            return None
        paths = [base / f for f in ([folders] if isinstance(folders, str) else folders)]
        return load_corpus(paths, rate, name=key, min_seconds=min_seconds)

    return {key: corpus(key, 1.0 if "speech" in key else 0.0)
            for key in ("speech", "far_speech", "noise", "music", "rir")}


class ExampleSource:
    """Examples for a model's task, a pure function of the seed.

    `validation`: rooms from another simulated bank than training's, and the speech as it was recorded (no
    speed perturbation: a model is judged on real voices).
    """

    def __init__(self, task: str, section: dict[str, Any], base: Path, synth: dict[str, Any] | None,
                 validation: bool = False):
        synth = dict(synth or {})
        self.task = task
        rir_bank_offset = 1 if validation else 0

        def speech_config(values: dict[str, Any] | None) -> SynthConfig:
            config = _dataclass_from(SynthConfig, values)
            return replace(config, rir_bank=config.rir_bank + rir_bank_offset,
                           speed_prob=0.0 if validation else config.speed_prob)

        if task == "denoise":
            config = speech_config(synth)
            c = _corpora(section, base, config.sample_rate)
            self.synth = Synthesizer(config, c["speech"], c["noise"], c["music"], c["rir"])
        elif task == "echo":
            near = speech_config(synth.pop("near", None))
            config = replace(_dataclass_from(EchoConfig, synth), near=near)
            c = _corpora(section, base, near.sample_rate)
            self.synth = EchoSynthesizer(config, c["speech"], c["far_speech"] or c["speech"], c["noise"],
                                         c["music"], c["rir"])
        else:
            raise ValueError(f"no training data for task {task!r}")

    def example(self, seed: int) -> Example:
        mix = self.synth.mixture(seed)
        if self.task == "denoise":
            return (mix.noisy,), (mix.clean,)
        return (mix.mic, mix.reference), (mix.near, mix.mic - mix.echo)


class TaughtSource:
    """Distillation: a denoising source whose target is a teacher's output for the noisy input (a peer of
    `quell.dns.baselines`, e.g. DeepFilterNet3), the clean signal kept as the second target.

    A teacher is slower than training (DeepFilterNet3 runs ~7x real time on one core, a DTLN step eats ~80x), so
    each output is computed once and cached as `cache/<seed>.npy`, and with `pool` > 0 the seeds cycle over the
    first `pool` mixtures from `first_seed`, which `teach` can fill ahead of the run, in parallel. The cache
    records what it was taught from (`taught_from`: teacher, data and synthesis); another recipe's is refused.
    """

    def __init__(self, source: ExampleSource, teacher: str, cache: Path, first_seed: int, pool: int = 0,
                 taught_from: dict[str, Any] | None = None):
        if source.task != "denoise":
            raise ValueError(f"a teacher can only teach denoising, not {source.task!r}")
        from quell.dns.baselines import BASELINES

        if teacher not in BASELINES:
            raise ValueError(f"unknown teacher {teacher!r} (known: {', '.join(BASELINES)})")
        missing = BASELINES[teacher].available()
        if missing is not None:
            raise RuntimeError(f"teacher {teacher} is not available: {missing}")
        self.source, self.teacher, self.cache = source, BASELINES[teacher](), cache
        self.first_seed, self.pool = first_seed, pool
        cache.mkdir(parents=True, exist_ok=True)
        if taught_from is not None:
            record = cache / "taught_from.json"
            if not record.exists():
                record.write_text(json.dumps(taught_from, indent=1, sort_keys=True))
            elif json.loads(record.read_text()) != json.loads(json.dumps(taught_from)):  # as JSON holds it
                raise ValueError(f"{cache} holds a teacher's outputs for other mixtures (its taught_from.json "
                                 "differs from this recipe's teacher, data or synth): use another run folder")

    def seed_of(self, seed: int) -> int:
        """The mixture an item's seed stands for (the pool cycles)."""
        return self.first_seed + (seed - self.first_seed) % self.pool if self.pool else seed

    def cached(self, seed: int) -> Path:
        """Where the teacher's output for the mixture of `seed` is (or will be) kept."""
        return self.cache / f"{seed}.npy"

    def example(self, seed: int) -> Example:
        seed = self.seed_of(seed)
        (noisy,), (clean,) = self.source.example(seed)
        path = self.cached(seed)
        if path.exists():
            taught = np.load(path)
        else:
            rate = self.source.synth.config.sample_rate
            taught = self.teacher.enhance(noisy, rate).audio.astype(np.float32)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
            np.save(tmp, taught)
            os.replace(tmp, path)
        return (noisy,), (taught, clean)


def teach(recipe_path: str | Path, out_dir: str | Path, shard: int = 0, shards: int = 1) -> int:
    """Fill a distillation run's teacher cache ahead of training: the pool's mixtures `shard`, `shard + shards`,
    ...; start one process per core. Returns how many outputs this shard computed (cached ones are skipped)."""
    recipe, cfg = load_recipe(recipe_path)
    if not cfg.teacher or not cfg.teacher_pool:
        raise ValueError("the recipe names no teacher and teacher_pool to fill")
    torch.set_num_threads(1)
    source = _taught_source(recipe, Path(recipe_path).parent, cfg, Path(out_dir))
    todo = [s for s in range(cfg.seed + shard, cfg.seed + cfg.teacher_pool, shards) if not source.cached(s).exists()]
    for seed in _progress(total=len(todo), desc=f"teaching {shard + 1}/{shards}", enabled=True, items=todo):
        source.example(seed)
    return len(todo)


def _taught_source(recipe: dict[str, Any], base: Path, cfg: TrainConfig, out: Path) -> TaughtSource:
    taught_from = {"teacher": cfg.teacher, "data": recipe["data"], "synth": recipe.get("synth"), "seed": cfg.seed}
    return TaughtSource(ExampleSource("denoise", recipe["data"], base, recipe.get("synth")), cfg.teacher,
                        out / "teacher", cfg.seed, cfg.teacher_pool, taught_from)


class MixtureDataset(Dataset):
    """Item i is the example for seed `seed + i`, as float32 tensors."""

    def __init__(self, source: ExampleSource | TaughtSource, seed: int, length: int):
        self.source, self.seed, self.length = source, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        inputs, targets = self.source.example(self.seed + index)
        return tuple(map(torch.from_numpy, inputs)), tuple(map(torch.from_numpy, targets))


class _RangeSampler(torch.utils.data.Sampler):
    """Indices start, start+stride, ...: resumes the data order at any step, and shards it across ranks."""

    def __init__(self, start: int, stop: int, stride: int = 1):
        self.start, self.stop, self.stride = start, stop, stride

    def __iter__(self):
        return iter(range(self.start, self.stop, self.stride))

    def __len__(self) -> int:
        return len(range(self.start, self.stop, self.stride))


def _outputs(model: nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    outputs = model(*inputs)
    return outputs if isinstance(outputs, tuple) else (outputs,)


def validate(model: nn.Module, clips: list[Example], device: torch.device, dnsmos: bool = False,
             aecmos: bool = False) -> dict[str, float]:
    """Mean SI-SDR, SI-SDR improvement, PESQ-WB and STOI of the model's first output on fixed clips; for clips
    whose target is silent (far-end single talk), the ERLE instead. With `dnsmos`, DNSMOS SIG/BAK/OVRL and P.808;
    with `aecmos` (echo models), AECMOS echo (far-end single talk, double talk) and degradation (near-end
    single talk, double talk) and "aecmos", the mean of the two."""
    model.eval()
    scores: dict[str, list[float]] = {"si_sdr": [], "si_sdr_i": [], "pesq_wb": [], "stoi": [], "erle": []}
    if dnsmos:
        scores.update(dnsmos_sig=[], dnsmos_bak=[], dnsmos_ovrl=[], dnsmos_p808=[])
    if aecmos:
        scores.update(aecmos_echo=[], aecmos_deg=[])
    with torch.no_grad():
        inputs = zip(*(clip[0] for clip in clips), strict=True)  # per model input, every clip's signal
        stacked = [torch.from_numpy(np.stack(signals)).to(device) for signals in inputs]
        batches = zip(*(signal.split(16) for signal in stacked), strict=True)
        enhanced = torch.cat([_outputs(model, batch)[0] for batch in batches]).cpu().numpy()
    for (inputs, targets), out in zip(clips, enhanced, strict=True):
        mic, clean = inputs[0], targets[0]
        near_talks = bool(np.any(np.abs(clean) > 1e-6))
        if aecmos:
            far_talks = bool(np.any(np.abs(inputs[1]) > 1e-6))
            scenario = "double_talk" if far_talks and near_talks else "far_end" if far_talks else "near_end"
            ratings = mos.aecmos(inputs[1], mic, out, scenario)
            if far_talks:
                scores["aecmos_echo"].append(ratings["echo"])
            if near_talks:
                scores["aecmos_deg"].append(ratings["degradation"])
        if not near_talks:
            scores["erle"].append(metrics.erle(mic, out))
            continue
        sdr = float(metrics.si_sdr(out, clean))
        scores["si_sdr"].append(sdr)
        scores["si_sdr_i"].append(sdr - float(metrics.si_sdr(mic, clean)))
        scores["pesq_wb"].append(metrics.pesq(out, clean, 16000, "wb"))
        scores["stoi"].append(metrics.stoi(out, clean, 16000))
        if dnsmos:
            ratings = mos.dnsmos(out)
            for name in ("sig", "bak", "ovrl", "p808"):
                scores[f"dnsmos_{name}"].append(ratings[name])
    model.train()
    means = {k: float(np.nanmean(v)) for k, v in scores.items() if v}
    if aecmos and "aecmos_echo" in means and "aecmos_deg" in means:
        means["aecmos"] = (means["aecmos_echo"] + means["aecmos_deg"]) / 2
    return means


class CsvLog:
    """Appends rows to a CSV (header on first write); mirrors them to TensorBoard when it is installed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, row: dict[str, Any]) -> None:
        """Append `row`; a row with columns the file lacks (a resumed run that now scores more) rewrites the
        file with every column, earlier rows left blank in the new ones."""
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        fields = list(rows[0]) if rows else []
        fields += [key for key in row if key not in fields]
        rewrite = not rows or len(fields) != len(rows[0])
        with self.path.open("w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if rewrite:
                writer.writeheader()
                writer.writerows(rows)
            writer.writerow(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, row["step"])


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(recipe_path: str | Path, out_dir: str | Path, max_minutes: float | None = None,
          init: str | Path | None = None) -> Path:
    """Train (or resume) the model of a recipe; returns the path of the best checkpoint.

    `init`: a checkpoint whose model weights a new run starts from (fine-tuning: optimizer, schedule and step
    count start afresh). A run that resumes from its own last checkpoint ignores it.
    """
    recipe, cfg = load_recipe(recipe_path)
    base = Path(recipe_path).parent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    rank, world = 0, 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    model = build_model(recipe).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    state = {"step": 0, "epoch": 0, "best": -math.inf, "stale_epochs": 0, "selection_metric": cfg.selection_metric}
    last, best = out / "last.pt", out / "best.pt"
    if last.exists():
        checkpoint = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        if "rng" in checkpoint:  # dropout continues as if never interrupted
            torch.set_rng_state(checkpoint["rng"])
        log.info("resumed from %s at step %d", last, state["step"])
        followed = state.get("selection_metric", "pesq_wb")  # runs from before it was recorded followed PESQ
        if followed != cfg.selection_metric:  # scores of another metric: the best, patience and LR plateau restart
            log.warning("the recipe now selects on %s instead of %s: best checkpoint and plateaus start over; "
                        "the best by %s is kept as best_%s.pt", cfg.selection_metric, followed, followed, followed)
            if best.exists():
                os.replace(best, out / f"best_{followed}.pt")
            state.update(best=-math.inf, stale_epochs=0, selection_metric=cfg.selection_metric)
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience)
    elif init is not None:
        source = torch.load(init, map_location=device, weights_only=False)
        adapt = getattr(model, "adapt_state_dict", None)  # a model may take weights of a related shape
        model.load_state_dict(adapt(source["model"]) if adapt else source["model"])
        # provenance, carried into the model card: what the weights had been through before this run
        state["init"] = {"checkpoint": str(init), "steps": source["state"]["step"], "recipe": source.get("recipe"),
                         "init": source["state"].get("init")}
        log.info("starting from the weights of %s", init)
    wrapped = nn.parallel.DistributedDataParallel(model) if distributed else model

    train_source = (_taught_source(recipe, base, cfg, out) if cfg.teacher
                    else ExampleSource(model.task, recipe["data"], base, recipe.get("synth")))
    valid_source = ExampleSource(model.task, recipe["valid"], base, recipe.get("synth"), validation=True)
    valid_clips = [valid_source.example(cfg.valid_seed + i) for i in range(cfg.valid_clips)]
    total_items = cfg.max_epochs * cfg.steps_per_epoch * cfg.batch_size
    dataset = MixtureDataset(train_source, cfg.seed, total_items)
    loss_fn = loss_with_args(cfg.loss, cfg.loss_args)
    csv_log = CsvLog(out / "log.csv") if rank == 0 else None
    started = time.monotonic()

    while state["epoch"] < cfg.max_epochs and state["stale_epochs"] < cfg.early_stop_patience:
        epoch_end = (state["epoch"] + 1) * cfg.steps_per_epoch
        sampler = _RangeSampler(state["step"] * cfg.batch_size + rank, epoch_end * cfg.batch_size, world)
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=cfg.workers,
            persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
        )
        losses: list[float] = []
        progress = _progress(total=epoch_end - state["step"], desc=f"epoch {state['epoch'] + 1}", enabled=rank == 0)
        tick = time.monotonic()
        for inputs, targets in loader:
            inputs, targets = [x.to(device) for x in inputs], [x.to(device) for x in targets]
            loss = loss_fn(_outputs(wrapped, inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state["step"] += 1
            losses.append(loss.item())
            audio_seconds = inputs[0].numel() / model.config.sample_rate * world
            speed = audio_seconds / max(time.monotonic() - tick, 1e-9)
            tick = time.monotonic()
            progress.set_postfix(loss=f"{loss.item():.2f}", speed=f"{speed:.0f}x", refresh=False)
            progress.update()
            out_of_time = max_minutes is not None and time.monotonic() - started > max_minutes * 60
            if _all_agree(out_of_time, distributed):
                break
        progress.close()
        if state["step"] < epoch_end:  # stopped by the time limit: keep the step, resume mid-epoch
            if rank == 0:
                _save(last, _checkpoint(model, optimizer, scheduler, state, recipe))
            break
        state["epoch"] += 1
        scores = validate(model, valid_clips, device, cfg.valid_dnsmos, cfg.valid_aecmos) if rank == 0 else None
        if distributed:  # every rank takes the same LR and stopping decisions
            shared = [scores]
            torch.distributed.broadcast_object_list(shared, src=0)
            scores = shared[0]
        score = scores[cfg.selection_metric]
        improved = score > state["best"]
        if improved:
            state["best"], state["stale_epochs"] = score, 0
        else:
            state["stale_epochs"] += 1
        scheduler.step(score)
        if rank == 0:
            row = {"epoch": state["epoch"], "step": state["step"], "train_loss": float(np.mean(losses)),
                   **scores, "lr": optimizer.param_groups[0]["lr"], "minutes": (time.monotonic() - started) / 60}
            csv_log.write(row)
            log.info("epoch %d: %s", state["epoch"], ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
            checkpoint = _checkpoint(model, optimizer, scheduler, state, recipe)
            if improved:
                _save(best, checkpoint)
            _save(last, checkpoint)
    if distributed:
        torch.distributed.destroy_process_group()
    return best if best.exists() else last


def _all_agree(flag: bool, distributed: bool) -> bool:
    """True on every rank when it is true on any (ranks must leave the loop together)."""
    if not distributed:
        return flag
    value = torch.tensor([float(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _checkpoint(model, optimizer, scheduler, state, recipe) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "state": dict(state), "recipe": recipe, "rng": torch.get_rng_state()}


def _progress(total: int, desc: str, enabled: bool, items=None):
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=5)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m quell.models.train` (and torchrun)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--out", default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--init", default=None, help="start a new run from this checkpoint's weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.recipe, run_folder(args.recipe, args.out), args.max_minutes, args.init)


if __name__ == "__main__":
    main()

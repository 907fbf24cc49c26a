"""The ``diffusion`` model family: a small DDPM on 28x28 images (the UNet, its training and
sampling: :mod:`pipelines.families.unet`; output functions and featurizer: :mod:`tda.featurizers.diffusion`).

Scorers: ``dtrak`` (TRAK on features averaged over a timestep grid, both sides the selected
output ``model.options.output``; ``trak`` is the same), ``diffusion-tracin`` and ``diffusion-retrac``
(train side: the training loss at the draw each example was trained with, replayed from the
training log, or with ``model.options.train_draws: grid`` the training-loss gradient averaged
over a timestep grid (one pooled slot); query side: one slot per grid draw), the generic
``tracin``, ``graddot`` and ``gradcos`` on those same slot features
(:class:`tda.scorers.SlotScorer`; ``tracin`` gives Diffusion-TracIn's scores), and the
representation scorers ``repsim`` and ``airrep`` on the UNet bottleneck (``mid``) averaged over
the query grid's draws (:class:`tda.featurizers.diffusion.NoisedInputs`). The feature layouts differ, so
their kind is part of the feature fingerprint (:meth:`DiffusionFamily.feature_tag`). Gradient
layouts take the dense or sparse or, with ``featurize.projection: factored`` / ``tensorsketch``,
the per-layer Kronecker projection of the UNet's convolutions and linear layers (GroupNorm
parameters are not covered; :mod:`tda.featurizers.factored`) or their TensorSketch, which also covers the
GroupNorms (:mod:`tda.projections.tensorsketch`). AirRep's training queries are training-split images outside
the training subset; its subset models report the output averaged over a seeded grid
(:class:`DiffusionSubsetJob`).

Queries are the configured query split followed by ``model.options.generate`` images sampled
from model 0 after training (ids from :data:`GENERATED_ID0`, label -1). The report prints the
proponents/opponents of a few test and generated queries and the "generally influential"
counts of TracIn and ReTrac (docs/methods.md section 4), which the score stage saves to
``scores/influential.json`` (:meth:`DiffusionFamily.extra_results`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from stores import FeatureStore, scores_files
from stores._io import save_npz
from tda.data.loading import example_ids
from tda.featurizers.diffusion import (OUTPUTS, DiffusionFeaturizer, DiffusionTask, GridDraws, NoiseSchedule, NoisedInputs,
                           RecordedDraws, SeededDraws, TrainLog, noise_from_seeds)
from tda.errors import CheckpointError, ConfigError, DataError
from tda.core.features import concat_blocks
from tda.featurizers.choice import FALLBACK, ProjectionChoice
from tda.scorers.diffusion import influence_counts
from tda.models.tasks import Task

from pipelines.layout import load_checkpoint_list
from pipelines.spec.method import find_method, methods
from pipelines.report import format_examples, similarity_note
from pipelines.spec.options import score_options
from pipelines.families.base import (Family, Reporting, Representations, Retraining, SaveFn, collated, featurize_params_named,
                   resolve_device, resolved_projection)
from pipelines.families.images import image_query_file, image_split, unused_train_rows
from pipelines.families.jobs import SubsetJob
from pipelines.families.registry import family_for, register_family
from pipelines.families.unet import OPTIMIZERS, TinyUNet, sample_ddpm, train_ddpm

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

GENERATED_ID0 = 1_000_000  # ids of generated query images: GENERATED_ID0 + j


@dataclass
class DiffusionOptions:
    """``model.options`` of the diffusion family (docs/methods.md sections 1 and 4)."""

    T: int = 1000  # diffusion timesteps
    beta_start: float = 1e-4  # linear beta schedule from beta_start to beta_end
    beta_end: float = 0.02
    time_dim: int = 32  # sinusoidal timestep embedding size
    output: str = "loss"  # attributed output f: loss, square, avg, l1, l2
    timesteps: int = 10  # K: timestep grid of query (and D-TRAK) gradients
    noise_draws: int = 1  # noise draws per grid timestep
    train_draws: str = "recorded"  # TracIn/ReTrac train side: "recorded" training draw, "seeded", or "grid"
    # ("grid": the training-loss gradient averaged over the timestep grid x noise_draws; timesteps x the cost)
    saved_checkpoints: int = 3  # evenly spaced checkpoints (last epoch included) when train.checkpoints=all
    generate: int = 8  # images sampled from model 0, appended to the queries
    sample_seed: int = 0  # seed of the sampler
    optimizer: str = "adam"  # "adam" or "sgd" (plain SGD: the step TracIn and ReTrac assume; docs/benchmarks/lds.md, DDPM)

    def __post_init__(self) -> None:
        NoiseSchedule(self.T, self.beta_start, self.beta_end)  # checks the schedule
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"model.options.optimizer is {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"model.options.output is {self.output!r}; choose one of {OUTPUTS}")
        if self.train_draws not in ("recorded", "seeded", "grid"):
            raise ConfigError(f"model.options.train_draws is {self.train_draws!r}; choose 'recorded', 'seeded' "
                              "or 'grid'")
        if not 1 <= self.timesteps <= self.T or min(self.noise_draws, self.saved_checkpoints, self.time_dim) < 1:
            raise ConfigError("model.options needs 1 <= timesteps <= T and noise_draws, saved_checkpoints, "
                              "time_dim >= 1")
        if self.generate < 0:
            raise ConfigError(f"model.options.generate must be >= 0, got {self.generate}")


def ddpm_collate(rows: Any) -> dict[str, torch.Tensor]:
    """Rows of 28x28 images -> ``{"x": (B, 1, 28, 28) float32 in [-1, 1]}``."""
    x = np.asarray(rows["image"], dtype=np.float32).reshape(-1, 1, 28, 28)
    return {"x": torch.from_numpy(x / 127.5 - 1.0)}


def _image_table(images: np.ndarray, ids: np.ndarray, labels: np.ndarray):
    """Arrow table with the columns and types of :func:`tda.data.loading.load_mnist`."""
    return pa.table({
        "id": pa.array(ids.astype(np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1).astype(np.uint8)), 784),
        "label": pa.array(labels.astype(np.int64)),
    })


class DiffusionFamily(Representations, Retraining, Reporting, Family):
    """DDPM on 28x28 images; D-TRAK, Diffusion-TracIn and Diffusion-ReTrac (tda.featurizers.diffusion)."""

    name = "diffusion"
    archs = ("unet",)
    data_names = ("mnist", "fashion-mnist")
    feature_kinds = ("grid", "slots", "representations")  # grid-averaged gradients, per-draw slots, h(z)
    options_type = DiffusionOptions
    airrep_budget = (64, 16, 1 / 6)  # a subset model: ~15 s on 2 cores at the demo's size (5 of 30 epochs)

    def schedule(self, cfg: RunConfig):
        o = self.options(cfg)
        return NoiseSchedule(o.T, o.beta_start, o.beta_end)

    @staticmethod
    def log_path(paths: RunPaths, model_index: int) -> Path:
        return paths.checkpoints / f"model-{model_index:02d}-trainlog.npz"

    @staticmethod
    def generated_path(paths: RunPaths) -> Path:
        return paths.checkpoints / "generated.npz"

    def data_files(self, cfg: RunConfig, paths: RunPaths | None) -> list[Path]:
        return [self.generated_path(paths)] if paths is not None and self.options(cfg).generate else []

    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        """Train images; queries: the query split, then the generated images (with ``paths``)."""
        d, o = cfg.data, self.options(cfg)
        out = {"train": image_split(cfg, "train", d.train_size),
               "query": image_query_file(cfg) if d.query_path else image_split(cfg, d.query_split, d.query_size)}
        if o.generate and paths is not None:
            gen = self.generated_path(paths)
            if not gen.is_file():
                raise DataError(f"generated query images {gen} are missing; run the train stage")
            with np.load(gen, allow_pickle=False) as z:
                images = z["images"]
            made = _image_table(images, GENERATED_ID0 + np.arange(len(images)), np.full(len(images), -1))
            out["query"] = datasets.Dataset(pa.concat_tables([out["query"].data.table, made]))
        return out

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return TinyUNet(cfg.model.hidden, in_channels=1, time_dim=self.options(cfg).time_dim)

    def task(self, cfg: RunConfig) -> Task:
        return DiffusionTask(self.schedule(cfg), self.options(cfg).output)

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        return ddpm_collate

    def checkpoint_epochs(self, cfg: RunConfig) -> list[int]:
        return self.spread_epochs(cfg, self.options(cfg).saved_checkpoints)

    def train_outputs(self, cfg: RunConfig, paths: RunPaths, model_index: int) -> list[Path]:
        extra = [self.generated_path(paths)] if model_index == 0 and self.options(cfg).generate else []
        return [self.log_path(paths, model_index), *extra]

    def train(self, cfg: RunConfig, paths: RunPaths, model_index: int, save: SaveFn) -> dict[str, Any]:
        """Train with recorded draws; the saved ``lr`` of a checkpoint is the mean step size since
        the previous one (TracIn's eta_c). Model 0 also samples the generated queries."""
        t, o, sched, data = cfg.train, self.options(cfg), self.schedule(cfg), self.datasets(cfg)
        saved, lrs = set(self.checkpoint_epochs(cfg)), []

        def on_epoch(epoch: int, model: nn.Module, lr: float) -> None:
            lrs.append(lr)
            if epoch in saved:
                save(epoch, model, lr=float(np.mean(lrs)))
                lrs.clear()

        model, log = train_ddpm(lambda: self.build_model(cfg), collated(data["train"], ddpm_collate)["x"],
                                example_ids(data["train"]), sched, epochs=t.epochs, lr=t.lr,
                                batch_size=t.batch_size, seed=t.seed + model_index, on_epoch=on_epoch,
                                optimizer=o.optimizer)
        save_npz(self.log_path(paths, model_index), **log.arrays())
        if model_index == 0 and o.generate:
            images = sample_ddpm(model, sched, o.generate, seed=o.sample_seed)  # (g, 1, 28, 28)
            save_npz(self.generated_path(paths), images=np.round((images.numpy() + 1) * 127.5).astype(np.uint8))
        return {"query_loss": self._query_loss(cfg, model, data["query"])}

    def _query_loss(self, cfg: RunConfig, model: nn.Module, query: Any) -> float:
        """Mean L_simple over the query split at seeded draws (a held-out training metric)."""
        x = collated(query, ddpm_collate)["x"]
        t, seeds = SeededDraws(self.options(cfg).T, seed=cfg.train.seed, side=2)(0, example_ids(query))
        with torch.no_grad():
            batch = {"x": x, "t": torch.from_numpy(t[:, 0]), "noise": noise_from_seeds(seeds[:, 0], x.shape[1:])}
            return float(DiffusionTask(self.schedule(cfg), "loss").output(model.eval(), batch).mean())

    def feature_tag(self, cfg: RunConfig, kind: str) -> str:
        """``-dtrak`` (grid) or ``-tracin`` (slots), the names these layouts had before kinds existed."""
        return super().feature_tag(cfg, kind) if kind == "representations" else TAGS[kind]

    def representation_module(self, cfg: RunConfig) -> str:
        """The UNet bottleneck (its ``mid`` residual block)."""
        return "mid"

    def representation_inputs(self, cfg: RunConfig, split: str) -> NoisedInputs:
        """``(x_t, t)`` at every draw of the query grid (timesteps x noises), seeded per side."""
        return NoisedInputs(self.schedule(cfg), self.grid_draws(cfg, split))

    def measure_key(self, cfg: RunConfig) -> dict[str, Any]:
        """The ground truth measures f on the query grid (seeded by ``featurize.seed``)."""
        return {"measure": "query-grid", "grid": self.grid_draws(cfg, "query").spec()}

    def grid_draws(self, cfg: RunConfig, split: str) -> GridDraws:
        """The seeded timestep x noise grid of ``split``: the train side (0) for ``train``, the
        query side (1) otherwise, the grid the query features and the LDS ground truth share."""
        o = self.options(cfg)
        return GridDraws(o.T, o.timesteps, o.noise_draws, seed=cfg.featurize.seed, side=0 if split == "train" else 1)

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """Training-split images outside the training subset (never trained on, never queried)."""
        return unused_train_rows(cfg, score_options(cfg, self).queries)

    def provenance(self, cfg: RunConfig, role: str, paths: RunPaths | None = None) -> list[str]:
        """As :meth:`Family.provenance`; generated query images are ``generated/<id>``."""
        keys = super().provenance(cfg, role, paths)
        if role != "query":
            return keys
        ids = example_ids(self.datasets(cfg, paths)["query"])
        return [f"generated/{i}" if i >= GENERATED_ID0 else key for i, key in zip(ids.tolist(), keys)]

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        return DiffusionSubsetJob(cfg, queries, epochs=epochs)

    def featurizer(self, cfg: RunConfig, split: str, kind: str, paths: RunPaths | None = None) -> Any:
        if kind == "representations":
            return self.representation_featurizer(cfg, split)
        o, f, sched = self.options(cfg), cfg.featurize, self.schedule(cfg)
        draws: Any = self.grid_draws(cfg, split)
        output, mode = o.output, ("mean" if kind == "grid" else "slots")
        if mode == "slots" and split == "train":  # the training loss at the trained draw, or pooled over the grid
            output, draws = "loss", self._train_draws(cfg, paths)
            mode = "pooled" if o.train_draws == "grid" else "slots"
        with featurize_params_named():
            return DiffusionFeaturizer(self.build_model(cfg), DiffusionTask(sched, output), draws, mode, k=f.k,
                                       seed=f.seed, kind=f.projector, param_names=f.params,
                                       device=resolve_device(f.device), backend=f.backend,
                                       projection=self._projection(cfg, paths), k_in=f.k_in, k_out=f.k_out,
                                       nonzeros=f.nonzeros)

    def auto_projection(self, cfg: RunConfig, paths: RunPaths, train: Any) -> ProjectionChoice:
        """``auto`` is sparse here: the UNet's small-drop LDS is near zero under every projection
        (docs/benchmarks/lds.md), so none is measured better than the one that covers every parameter."""
        return ProjectionChoice(FALLBACK, "the diffusion family's default: no projection is measured better "
                                          "for the UNet (its LDS is near zero under each)")

    @staticmethod
    def _projection(cfg: RunConfig, paths: RunPaths | None) -> str:
        resolved = resolved_projection(cfg, paths)
        return FALLBACK if resolved == "auto" else resolved

    def _train_draws(self, cfg: RunConfig, paths: RunPaths | None) -> Any:
        o = self.options(cfg)
        if o.train_draws == "seeded":
            return SeededDraws(o.T, seed=cfg.featurize.seed, side=0)
        if o.train_draws == "grid":
            return GridDraws(o.T, o.timesteps, o.noise_draws, seed=cfg.featurize.seed, side=0)
        if paths is None:
            raise ConfigError("recorded training draws need the run folder")
        entries, logs = load_checkpoint_list(paths), {}
        for e in entries:
            if e["model"] not in logs:
                path = self.log_path(paths, e["model"])
                if not path.is_file():
                    raise CheckpointError(f"training log {path} is missing; rerun the train stage")
                with np.load(path, allow_pickle=False) as z:
                    logs[e["model"]] = TrainLog.from_arrays(dict(z))
        return RecordedDraws({e["id"]: logs[e["model"]] for e in entries}, {e["id"]: e["epoch"] for e in entries})

    def extra_results(self, cfg: RunConfig, paths: RunPaths, scorer: Any, kind: str) -> None:
        """The generally influential training images of every applicable scorer (exact top-k),
        saved to ``scores/influential.json`` for the report."""
        counts = influence(self, cfg, paths, scorer, kind)
        scores_files.save_influential(paths.scores, counts)

    def report(self, cfg: RunConfig, paths: RunPaths) -> str | None:
        return report(self, cfg, paths)


# ------------------------------------------------------------------ report
def influence(family: DiffusionFamily, cfg: RunConfig, paths: RunPaths, scorer: Any,
              kind: str) -> dict[str, dict[str, Any]]:
    """Generally influential training examples of every applicable scorer (exact top-k)."""
    train, query = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    qblk = concat_blocks(list(query.iter_blocks()))  # every shard (iter_blocks yields per shard)
    scorers: dict[str, Any] = {}
    if kind == "slots":  # every method of per-draw features alone (Diffusion-TracIn, Diffusion-ReTrac)
        scorers = {name: m.build(cfg, paths, family, kind) for name, m in methods().items() if m.kinds == ("slots",)}
    if cfg.score.scorer not in scorers:
        scorers[cfg.score.scorer] = scorer
    return influence_counts(qblk, train, scorers, min(cfg.score.topk, len(train)), cfg.score.influential_fraction)


def _labels(dataset: Any) -> dict[int, int]:
    cols = dataset.with_format("numpy")
    return dict(zip(np.asarray(cols["id"]).tolist(), np.asarray(cols["label"]).tolist()))


def _titles(output: str, scorer: str) -> tuple[str, str]:
    method = find_method(scorer)
    if method is not None and method.similarity:
        return f"least similar training images ({method.title})", f"most similar training images ({method.title})"
    if output == "loss":
        return ("opponents, score < 0: training on them lowers the image's loss (makes it more likely)",
                "proponents, score > 0: training on them raises the image's loss")
    return f"opponents: training on them lowers f = {output}", f"proponents: training on them raises f = {output}"


def _ids(ids: np.ndarray, shown: int = 8) -> str:
    return "" if not len(ids) else "(ids " + ", ".join(map(str, ids[:shown].tolist())) + (" ...)" if len(ids) > shown else ")")


def report(family: DiffusionFamily, cfg: RunConfig, paths: RunPaths) -> str:
    """Proponents/opponents of ``score.show`` test and generated queries, and influence counts."""
    o, data = family.options(cfg), family.datasets(cfg, paths)
    labels, qlabels = _labels(data["train"]), _labels(data["query"])
    top = scores_files.load_topk(paths.scores)
    ckpts = load_checkpoint_list(paths)
    qids = top["query_ids"]
    gen = qids >= GENERATED_ID0
    losses = [c["query_loss"] for c in ckpts if "query_loss" in c]
    lines = [f"\n{cfg.name}: DDPM (T={o.T}), {len(top['train_ids'])} training images, {len(qids)} queries "
             f"({int((~gen).sum())} test, {int(gen.sum())} generated), {len(ckpts)} checkpoints, scorer "
             f"{cfg.score.scorer}, f = {o.output}" + (f", held-out loss {np.mean(losses):.4f}" if losses else ""),
             "score > 0: training on the example raises f(query) (docs/methods.md sign convention)"
             + similarity_note(cfg.score.scorer)]
    low, high = _titles(o.output, cfg.score.scorer)
    shown = min(5, cfg.score.topk)
    for row in [*np.nonzero(~gen)[0][: cfg.score.show], *np.nonzero(gen)[0][: cfg.score.show]]:
        qid = int(qids[row])
        lines.append(f"  query id {qid}  " + ("generated image" if gen[row] else f"test image, label {qlabels[qid]}"))
        lines += format_examples(low, top["opponent_ids"][row][:shown], top["opponent_scores"][row][:shown], labels)
        lines += format_examples(high, top["proponent_ids"][row][:shown], top["proponent_scores"][row][:shown], labels)
    counts = read_influential(paths)
    k, frac = next(iter(counts.values()))["k"], cfg.score.influential_fraction
    lines.append(f"generally influential training images (in the top-{k} of more than {frac:.0%} of the "
                 f"{len(qids)} queries):")
    for name, c in counts.items():
        lines.append(f"  {name:<17} lowering f: {len(c['opponents']):>4} {_ids(c['opponents'])}")
        lines.append(f"  {'':<17} raising f:  {len(c['proponents']):>4} {_ids(c['proponents'])}")
    return "\n".join(lines)


def read_influential(paths: RunPaths) -> dict[str, dict[str, Any]]:
    """The counts :meth:`DiffusionFamily.extra_results` saved (ids as arrays)."""
    return scores_files.load_influential(paths.scores)


TAGS = {"grid": "-dtrak", "slots": "-tracin"}


class DiffusionSubsetJob(SubsetJob):
    """Train the DDPM recipe on the images; each query's output averaged over a seeded grid.

    The grid is the query featurizer's (:meth:`DiffusionFamily.grid_draws`): the measured f is
    the very function whose gradient the query features hold. With other noise draws the ground
    truth measured a different noisy estimate of the query's loss than the one attributed.
    """

    supports_weights = True  # small-drop keeps the full run's batches, timesteps and noise

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        return self.run_weighted(train, train_ids, query, query_ids, seed, None)

    def run_weighted(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int,
                     weights: torch.Tensor | None) -> torch.Tensor:
        t, family = self.cfg.train, family_for(self.cfg)
        o, sched = family.options(self.cfg), family.schedule(self.cfg)
        model, _ = train_ddpm(lambda: family.build_model(self.cfg), train["x"], train_ids, sched, epochs=self.epochs,
                              lr=t.lr, batch_size=t.batch_size, seed=seed, weights=weights, optimizer=o.optimizer)
        steps, seeds = family.grid_draws(self.cfg, "query")(0, query_ids)  # (m, S) each
        with torch.no_grad():
            return drawn_output(DiffusionTask(sched, o.output), model, query["x"], steps, seeds)


def drawn_output(task: DiffusionTask, model: nn.Module, x: torch.Tensor, steps: np.ndarray,
                 seeds: np.ndarray) -> torch.Tensor:
    """(B,) the task's output of each image averaged over its draws: ``steps`` and ``seeds``
    (B, S) from a :class:`GridDraws` (differentiable; the ground truth calls it without grad)."""
    per_draw = [task.output(model, {"x": x, "t": torch.from_numpy(steps[:, s]),
                                    "noise": noise_from_seeds(seeds[:, s], x.shape[1:])})
                for s in range(steps.shape[1])]
    return torch.stack(per_draw).mean(dim=0)




register_family(DiffusionFamily())

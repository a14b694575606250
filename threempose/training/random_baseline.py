"""Does the search beat chance? The random-baseline protocol (Li & Talwalkar 2019; Yang et al. 2020).

:class:`RandomBaseline` runs, in one output directory ``DIR``:

1. the search of a search config (a :class:`~threempose.training.search_job.SearchJob` in ``DIR/search``),
   or takes a given genotype;
2. K random genotypes of the *same* search space whose GFLOPs lie within +-tolerance of the
   searched one's (:func:`~threempose.nas.random_genotype.sample_matched_genotypes`), fixed
   once in ``DIR/candidates.json``;
3. (K + 1) x N trainings, each a :class:`~threempose.training.train_job.TrainJob` of the train config with
   run seed ``run.seed + i`` (i < N) in its own run directory ``DIR/runs/<name>-seed<S>``,
   then its val AP on the whole held-out val split, written last (atomically) as that
   directory's ``result.json``;
4. ``DIR/baseline.json``, ``DIR/baseline.md`` and ``DIR/baseline.png``
   (:mod:`threempose.training.baseline_report`).

Resume (``resume=True``, the command's ``--resume``): a finished search (its genotype) and
every training with a ``result.json`` are kept; a killed search or training continues from
its last epoch checkpoint; the protocol's own arguments must be those it was started with.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from threempose.config import Config, ModelConfig, check_config_command, config_to_dict, load_config
from threempose.engine.distributed import DistContext
from threempose.engine.job import EpochJob
from threempose.engine.run_dir import RunDir
from threempose.nas.genotype import Genotype
from threempose.nas.random_genotype import CostedGenotype, genotype_cost, sample_matched_genotypes
from threempose.training.baseline_report import draw_ap_vs_gflops, markdown_table, summarize
from threempose.training.search_job import SearchJob
from threempose.training.train_job import TrainJob
from threempose.training.validate import validation_ap
from threempose.util.errors import UserError
from threempose.util.files import atomic_open, atomic_write_json

RESULT_FILE = "result.json"


class BaselineError(UserError):
    """The protocol's output directory or arguments do not fit (e.g. resuming another protocol)."""


@dataclass
class BaselineSettings:
    """The protocol's arguments (recorded in ``DIR/protocol.json`` and ``baseline.json``)."""

    search_config: Optional[str]      # searched by the protocol unless ``genotype`` is given
    train_config: str
    random: int                       # K random genotypes
    seeds: int                        # N training seeds per genotype
    genotype: Optional[str] = None    # a genotype file instead of a search
    tolerance: float = 0.05           # relative GFLOPs window of the random genotypes
    max_draws: int = 2000             # rejection sampling's bound
    sample_seed: int = 0              # seed of the random genotypes' draws
    bootstrap_samples: int = 10000
    bootstrap_seed: int = 0


@dataclass
class Candidate:
    """One genotype of the comparison, with its cost at the train config's input size."""

    name: str                        # "searched", "random-01", ...
    genotype: Genotype
    gflops: float
    params_m: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "genotype": self.genotype.to_dict(), "gflops": self.gflops,
                "params_m": self.params_m}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "Candidate":
        return cls(raw["name"], Genotype.from_dict(raw["genotype"], source), float(raw["gflops"]),
                   float(raw["params_m"]))


class RandomBaseline:
    """The protocol (see the module docstring).

    Args:
        out: the output directory ``DIR``.
        settings: what to compare and how.
        ctx: the (single-rank) context every job runs in.
        say: where progress lines go (stderr by default).
        clock: seconds, for the ETA (tests inject one).
    """

    def __init__(self, out: str | Path, settings: BaselineSettings, ctx: DistContext,
                 say: Optional[Callable[[str], None]] = None, clock: Callable[[], float] = time.time):
        if (settings.search_config is None) == (settings.genotype is None):
            raise BaselineError("give either a search config or a genotype, not both and not neither")
        if settings.random < 1 or settings.seeds < 1:
            raise BaselineError(f"--random and --seeds must be >= 1, got {settings.random} and {settings.seeds}")
        self.out, self.settings, self.ctx = Path(out), settings, ctx
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.train_cfg = load_config(settings.train_config)
        check_config_command(settings.train_config, "train")
        if settings.search_config is not None:
            self.search_cfg = load_config(settings.search_config)
            check_config_command(settings.search_config, "search")
        self.seeds = [self.train_cfg.run.seed + i for i in range(settings.seeds)]

    # ---- paths --------------------------------------------------------------- #
    @property
    def protocol_path(self) -> Path:
        return self.out / "protocol.json"

    @property
    def candidates_path(self) -> Path:
        return self.out / "candidates.json"

    def training_dir(self, name: str, seed: int) -> Path:
        return self.out / "runs" / f"{name}-seed{seed}"

    # ---- the protocol ------------------------------------------------------------ #
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or with ``resume`` continue) the whole protocol; returns ``baseline.json``'s content."""
        self.open_out(resume)
        candidates = self.candidates()
        results = self.train_all(candidates)
        return self.write_report(candidates, results)

    def open_out(self, resume: bool) -> None:
        """Create ``DIR`` (empty or new) and record the settings; with ``resume``, check them."""
        recorded = json.loads(json.dumps({
            **asdict(self.settings), "resolved_train_config": config_to_dict(self.train_cfg),
            "resolved_search_config": (config_to_dict(self.search_cfg) if self.settings.search_config
                                       is not None else None)}))
        if resume:
            if not self.protocol_path.is_file():
                raise BaselineError(f"--resume: {self.out} holds no protocol ({self.protocol_path.name} is "
                                    f"missing); start it without --resume")
            stored = json.loads(self.protocol_path.read_text())
            diffs = [k for k in recorded if k in stored and stored[k] != recorded[k]]   # (older: fewer keys)
            if diffs and diffs[0].startswith("resolved_"):
                what = diffs[0].removeprefix("resolved_").replace("_", " ")
                raise BaselineError(f"--resume: the {what} now reads differently from when {self.out} started "
                                    f"(its files changed); restore them or use a new --out")
            if diffs:
                k = diffs[0]
                raise BaselineError(f"--resume: {self.out} ran another protocol: {k} was {stored.get(k)!r}, "
                                    f"now {recorded[k]!r}; resume with the same arguments or use a new --out")
            self.say(f"[baseline] resuming {self.out}")
            return
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise BaselineError(f"--out {self.out} exists and is not an empty directory; pass --resume to "
                                f"continue the protocol there, or choose another directory")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.protocol_path, recorded)

    def candidates(self) -> list[Candidate]:
        """The searched genotype (searching first if needed) and the K matched random ones,
        drawn once and kept in ``candidates.json``."""
        if self.candidates_path.is_file():
            raw = json.loads(self.candidates_path.read_text())
            return [Candidate.from_dict(c, str(self.candidates_path)) for c in raw]
        searched = self.searched_genotype()
        t = self.train_cfg
        size = (t.data.input_size, t.data.input_size)
        target = genotype_cost(searched, size, t.model.num_joints, t.model.stem_blocks)
        s = self.settings
        self.say(f"[baseline] searched genotype: {target.gflops:.4g} GFLOPs, {target.params_m:.4g} M params; "
                 f"drawing {s.random} random genotypes within +-{s.tolerance:.0%}")
        space = _space_of(self.search_cfg.model if s.search_config is not None else None, searched, t)
        picked = sample_matched_genotypes(space, size, target.gflops, s.random, s.tolerance, s.max_draws,
                                          s.sample_seed, exclude=[searched])
        candidates = [_candidate("searched", target)] + [_candidate(f"random-{i + 1:02d}", c)
                                                         for i, c in enumerate(picked)]
        atomic_write_json(self.candidates_path, [c.to_dict() for c in candidates])
        return candidates

    def searched_genotype(self) -> Genotype:
        """The given genotype, or the result of the search in ``DIR/search`` (run or resumed)."""
        if self.settings.genotype is not None:
            return Genotype.load(self.settings.genotype)
        path = self.out / "search"
        saved = path / "genotype.json"
        if saved.is_file():
            return Genotype.load(saved)
        started = self.clock()
        self.say(f"[baseline] searching with {self.settings.search_config} in {path}")
        _run_in(SearchJob(self.search_cfg, self.ctx), path)
        self.say(f"[baseline] search done in {self.clock() - started:.0f} s")
        return Genotype.load(saved)

    def train_all(self, candidates: list[Candidate]) -> dict[tuple[str, int], float]:
        """Every (candidate, seed) training's val AP, training those without a result."""
        plan = [(c, seed) for seed in self.seeds for c in candidates]
        results: dict[tuple[str, int], float] = {}
        durations: list[float] = []
        for c, seed in plan:
            done = self.read_result(c.name, seed)
            if done is not None:
                results[(c.name, seed)] = done["ap"]
                durations.append(done["seconds"])
        if results:
            self.say(f"[baseline] {len(results)} of {len(plan)} trainings already finished; kept")
        for i, (c, seed) in enumerate(plan):
            if (c.name, seed) in results:
                continue
            self.say(f"[baseline] training {i + 1}/{len(plan)}: {c.name} seed {seed} "
                     f"({c.gflops:.4g} GFLOPs) in {self.training_dir(c.name, seed)}")
            result = self.train_one(c, seed)
            results[(c.name, seed)] = result["ap"]
            durations.append(result["seconds"])
            left = len(plan) - len(results)
            eta = left * sum(durations) / len(durations)
            self.say(f"[baseline] training {i + 1}/{len(plan)} done: {c.name} seed {seed} AP {result['ap']:.4f} "
                     f"in {result['seconds']:.0f} s; {len(results)}/{len(plan)} done, {left} to go, ETA "
                     f"{_duration(eta)}" + (f" (about {time.strftime('%H:%M', time.localtime(self.clock() + eta))})"
                                             if left else ""))
        return results

    def read_result(self, name: str, seed: int) -> Optional[dict[str, Any]]:
        """A finished training's ``result.json`` (None when it has not finished)."""
        path = self.training_dir(name, seed) / RESULT_FILE
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def train_one(self, candidate: Candidate, seed: int) -> dict[str, Any]:
        """Train ``candidate`` with the train config at run seed ``seed`` (resuming a killed
        training), score its val AP on the whole val split, write ``result.json``."""
        cfg = copy.deepcopy(self.train_cfg)      # as read when the protocol started
        cfg.run.seed = seed
        path = self.training_dir(candidate.name, seed)
        started = self.clock()
        job = TrainJob(cfg, self.ctx, candidate.genotype)
        _run_in(job, path)
        ap = final_val_ap(job)
        seconds = self.clock() - started
        result = {"name": candidate.name, "seed": seed, "ap": ap, "seconds": seconds,
                  "gflops": candidate.gflops}
        atomic_write_json(path / RESULT_FILE, result)
        return result

    def write_report(self, candidates: list[Candidate], results: dict[tuple[str, int], float]) -> dict[str, Any]:
        """``baseline.json``, ``baseline.md`` and ``baseline.png`` from every training's AP."""
        entries = [{"name": c.name, "genotype": c.genotype.to_dict(), "gflops": c.gflops,
                    "params_m": c.params_m, "seeds": self.seeds,
                    "ap": [results[(c.name, s)] for s in self.seeds]} for c in candidates]
        searched, random = entries[0], entries[1:]
        s = self.settings
        summary = summarize(searched["ap"], [e["ap"] for e in random], s.bootstrap_samples, s.bootstrap_seed)
        report = {"searched": searched, "random": random, "summary": summary,
                  "config": {**asdict(s), "train_input_size": self.train_cfg.data.input_size}}
        atomic_write_json(self.out / "baseline.json", report)
        table = markdown_table(searched, random, summary)
        with atomic_open(self.out / "baseline.md", "w") as f:
            f.write(table)
        draw_ap_vs_gflops(searched, random, self.out / "baseline.png")
        self.say("[baseline] " + table.strip().splitlines()[-1])
        return report


def final_val_ap(job) -> float:
    """COCO keypoint AP of a finished :class:`~threempose.training.train_job.TrainJob`'s network (last exit)
    on the whole val split (the held-out images, never trained on)."""
    net = job.net
    net.eval()
    try:
        with torch.no_grad():
            def exit_fn(x):
                last = net(x)[-1]
                return last.heatmaps, last.tags
            return float(validation_ap(exit_fn, job.data, job.cfg.infer, 0)["AP"])
    finally:
        net.train()


def _candidate(name: str, costed: CostedGenotype) -> Candidate:
    return Candidate(name, costed.genotype, costed.gflops, costed.params_m)


def _space_of(model: Optional[ModelConfig], searched: Genotype, train_cfg: Config) -> ModelConfig:
    """The search space to draw from: ``model`` (the search config's fabric), with the train
    config's stem and joints (the networks that are trained, and costed). Without a search
    config (None), the fabric of the given genotype (rows, layers, hidden, channels, exits,
    Fuse-Split) with the train config's ops and Dyn-EGS states."""
    space = dataclasses.replace(model or train_cfg.model, num_joints=train_cfg.model.num_joints,
                                stem_blocks=train_cfg.model.stem_blocks)
    if model is None:
        space = dataclasses.replace(space, rows=searched.rows, layers=searched.layers, hidden=searched.hidden,
                                    channels=searched.channels, eels=list(searched.eels),
                                    fuse_split=searched.fuse_split, cell_options=searched.cell_options)
    return space


def _run_in(job: EpochJob, path: Path) -> None:
    """Run ``job`` in the run directory ``path``: a new one, or the continuation of a killed
    run there (from its last checkpoint); a directory a kill left without its ``config.json``
    is started over."""
    if path.is_dir() and not (path / RunDir.CONFIG).is_file():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    job.run_path = path
    job.run(resume=str(path) if path.is_dir() else None)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"

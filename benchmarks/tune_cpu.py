"""Recipe search on validation for the CPU protocol.

Every tuned method gets the same budget: ``--count`` Bayesian trials of W&B's sweeps engine
(``sweep-local``: ``experiments/sweeps/tune_<method>.yaml``) at each of ``--bits``, each trial a run of
``--steps`` steps on the cached EfficientNet-Lite0 features of CIFAR-10 (the same features, split
seed, batch and length as ``results_cpu.py``), scored by its best validation MAP. Validation queries come
from the database minus the training images and rank a 5,000-image database subset: the test queries
are never seen. Trials run in this process (the sweep's command line, parsed by the project's config),
so the engine, its state file and its resumption are those of ``dsrh sweep-local``.

The best trial of each (method, bits) is written to ``--out`` (JSON), which ``results_cpu.py --tuned``
reads. Run it with nothing else on the machine.

``--protocol finetune`` runs the same search end to end: each trial is finetune_cpu.py's run (EfficientNet-Lite0's
top 3 blocks at 96 px on cached lower-block outputs, class-balanced batches, ``--steps`` steps), validation only,
and every method searches its own loss knobs, dropout, its learning rate and the backbone's lr multiplier
(:func:`finetune_sweep`, from the method's sweep file; DRH and DRH+ search DSRH's without their ablated terms).
The choice replaces the method's entry in ``benchmarks/results/finetune_cpu_recipe.json``, the settings file
``finetune_cpu.py --tuned`` (``make bench-finetune``) reads; a searched entry's lr and settings win over
``--lr``. Beside the trials, each search has the method's untuned run as a candidate (its shipped settings at
finetune_cpu.py's lr and multiplier, seed ``--seed``, from ``--start``: finetune_cpu.py's results), chosen when
it validates better than every trial. Trials resume where they stopped (sweep-local's state); each search's
trial records are also kept in ``benchmarks/results/finetune_search/`` (``--keep-dir``), so a search stopped with
its checkout continues on a fresh one from its next trial.

    python -m benchmarks.tune_cpu --protocol finetune --bits 12 48 --count 6    # make bench-tune-finetune

    python -m benchmarks.tune_cpu --methods DSRH HashNet CSQ --bits 12 48 --count 16
    python -m benchmarks.tune_cpu --methods GreedyHash OrthoHash DSH DHN --bits 12 48 --count 16

Later rounds (every method alike):

* ``--pool``: earlier rounds' files; each (method, bits) keeps the best trial over all rounds.
* ``--refine``: this round searches around the pooled best (a re-scored choice where there is one) instead
  of the sweep file's whole space
  (:func:`refine_sweep`: a knob the earlier rounds chose a value for is fixed, or searched within a factor
  of 2 of it; a knob they never searched keeps its full range).
* ``--rescore K``: the K best trials (pooled) run again with ``--rescore-seeds`` (each seed its own split
  and initialisation), and the one with the best mean validation MAP over all its seeds is chosen, so the
  choice is less a matter of one seed's luck.
* ``--alternatives KNOB``: the re-scored choice with each other value of a categorical knob, on the same
  seeds, kept where its mean validation MAP is higher (:func:`alternatives`). With ``--count 0`` and
  ``--pool`` it runs on the latest pool file's choice without a new search.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from benchmarks import finetune_cpu
from benchmarks.results_cpu import add_protocol_args, base_overrides, load_results, repo_relative
from dsrh_lightning.config import load_config
from dsrh_lightning.files import write_text
from dsrh_lightning.runs.sweep_local import (load_sweep, resolve_sweep_path, run_folder_overrides, run_sweep_local,
                                             state_path, sweep_runs)

REPO = Path(__file__).resolve().parents[1]

# method -> sweep file (experiments/sweeps/)
SWEEPS = {"DSRH": "tune_dsrh.yaml", "HashNet": "tune_hashnet.yaml", "CSQ": "tune_csq.yaml",
          "GreedyHash": "tune_greedyhash.yaml", "OrthoHash": "tune_orthohash.yaml", "DSH": "tune_dsh.yaml",
          "DHN": "tune_dhn.yaml"}


# End to end (--protocol finetune): method -> (sweep file whose method knobs it searches, experiment config,
# knobs it drops). Every method of finetune_cpu.py but the paper's constants; DRH and DRH+ search DSRH's
# space without the terms they ablate.
FINETUNE_SWEEPS = {
    "DRH": ("tune_dsrh.yaml", "drh", ["loss.cls_weight", "loss.orth_weight"]),
    "DRH+": ("tune_dsrh.yaml", "drh_plus", ["loss.cls_weight"]),
    "DSRH": ("tune_dsrh.yaml", "dsrh", []),
    "DPSH": ("tune_dpsh.yaml", "dpsh", []), "DTSH": ("tune_dtsh.yaml", "dtsh", []),
    "HashNet": ("tune_hashnet.yaml", "hashnet", []), "CSQ": ("tune_csq.yaml", "csq", []),
    "GreedyHash": ("tune_greedyhash.yaml", "greedyhash", []), "OrthoHash": ("tune_orthohash.yaml", "orthohash", []),
    "DSH": ("tune_dsh.yaml", "dsh", []), "DHN": ("tune_dhn.yaml", "dhn", []),
}
# What every method searches end to end besides its own loss knobs (and model.dropout): the heads' learning
# rate and the backbone's multiplier of it. The network, the batches (class-balanced, 8 classes x 8) and the
# schedule are finetune_cpu.py's, the same for every method. The lr starts at 0.005: in 1,500 steps, lower rates
# leave the codes near chance (benchmarks/results/archive/finetune_search_dsrh48_lr0001.json).
FINETUNE_SHARED = {
    "optim.lr": {"distribution": "log_uniform_values", "min": 0.005, "max": 0.1},
    "optim.backbone_lr_mult": {"values": [0.1, 0.3, 1.0]},
}


# A run's overrides that are its run's, not its settings: folder, test ranking, logger.
RUN_ONLY = ("output_dir", "name", "resume", "trainer.test_after_fit", "logger.name")


def finetune_sweep(sweep: Dict[str, Any], experiment: str, drop: Sequence[str] = ()) -> Dict[str, Any]:
    """The end-to-end search derived from a frozen-feature sweep file (pure): its ``loss.*`` knobs (less ``drop``)
    and ``model.dropout``, plus :data:`FINETUNE_SHARED`; the command's ``experiment=`` becomes ``experiment``.
    The frozen protocol's network knobs (shared layer, feature standardisation, bag size, sampling) are left out:
    the end-to-end protocol fixes them for every method."""
    params = {k: copy.deepcopy(v) for k, v in FINETUNE_SHARED.items()}
    params.update({k: copy.deepcopy(v) for k, v in sweep["parameters"].items()
                   if (k.startswith("loss.") or k == "model.dropout") and k not in drop})
    command = [f"experiment={experiment}" if isinstance(a, str) and a.startswith("experiment=") else a
               for a in sweep["command"]]
    return dict(copy.deepcopy(sweep), command=command, parameters=params)


def finetune_protocol(args, bits: int) -> List[str]:
    """The end-to-end protocol every trial shares: finetune_cpu.py's run (its network, batches and schedule, with
    ``--steps``, ``--val-every``, ``--lr-decay-steps`` and ``--seed`` from here), validation only; no method, lr or
    output folder (the trial's)."""
    ft = finetune_cpu.build_parser().parse_args(["--steps", str(args.steps), "--val-every", str(args.val_every),
                                                 "--lr-decay-steps", str(args.lr_decay_steps)])
    for key in ("dataset", "data_root", "split_dir", "feature_dir", "backbone", "weights"):  # where the data is
        if hasattr(args, key):
            setattr(ft, key, getattr(args, key))
    over = finetune_cpu.run_overrides(ft, "DSRH", bits, args.seed, {})
    own = ("experiment", "optim.lr", "optim.backbone_lr_mult", *RUN_ONLY)
    return [o for o in over if o.split("=", 1)[0] not in own] + [
        "data.cache_flip=true", "trainer.test_after_fit=false", "trainer.checkpoint_every_n_steps=0",
        "logger.name=none",
    ] + list(args.override)


def protocol_overrides(args, bits: int) -> List[str]:
    """The protocol every trial shares, validation only: results_cpu.py's frozen features at ``--steps``
    (``--protocol frozen``) or finetune_cpu.py's end-to-end run (``--protocol finetune``)."""
    if getattr(args, "protocol", "frozen") == "finetune":
        return finetune_protocol(args, bits)
    return base_overrides(args, bits, args.seed) + [
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.val_every}",
        f"optim.lr_decay_steps={args.lr_decay_steps}", f"data.batch_size={args.batch_size}",
        "trainer.test_after_fit=false", "trainer.checkpoint_every_n_steps=0",
    ] + list(args.override)  # last among the protocol's settings (a trial's swept values still follow)


def train_in_process(overrides: List[str], out_dir: Path, name: str) -> Tuple[int, Optional[Dict[str, Any]]]:
    """sweep-local's ``run_fn``: the trial's ``dsrh train`` command, run in this process."""
    from dsrh_lightning.runs.train import train

    try:
        result = train(load_config(overrides))
    except Exception as exc:  # a failed trial is recorded as failed; the search goes on
        logging.getLogger(__name__).error("trial %s failed: %s", name, exc)
        return 1, None
    return 0, result


def rescore_run(overrides: List[str], protocol: List[str], sweep_dir: Path, name: str) -> List[str]:
    """A re-scoring run's ``dsrh train`` overrides: the candidate's settings, the protocol at the run's seed, and
    its own folder ``<sweep_dir>/rescore/<name>`` (:func:`run_folder_overrides`: ``resume=auto``)."""
    return list(overrides) + list(protocol) + run_folder_overrides(sweep_dir / "rescore", name)


def kept_state(keep_dir: Optional[str], sweep_dir: Path) -> Optional[Path]:
    """Where a search's trial records are kept outside ``runs/`` (``--keep-dir``): ``<keep_dir>/<folder>.json``."""
    return Path(keep_dir) / f"{sweep_dir.name}.json" if keep_dir else None


def restore_search(kept: Optional[Path], sweep_dir: Path, sweep_file: Path) -> int:
    """Give ``sweep_dir`` the kept trial records of a search an earlier checkout stopped (its ``runs/`` gone), as
    its sweep-local state, when it has none; returns how many trials that restored. sweep-local then proposes the
    next trial as it would have (the engine is seeded by the trial index and reads only the records)."""
    if kept is None or not kept.is_file() or state_path(sweep_dir).is_file():
        return 0
    state = json.loads(kept.read_text())
    state["sweep_file"] = str(Path(sweep_file).resolve())  # this checkout's copy of the same sweep
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(state_path(sweep_dir), json.dumps(state, indent=2))
    return len(state.get("runs", []))


def keep_search(kept: Optional[Path], sweep_dir: Path) -> None:
    """Copy ``sweep_dir``'s sweep-local state (every finished trial's record) to ``kept``."""
    if kept is not None and state_path(sweep_dir).is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_text(kept, state_path(sweep_dir).read_text())


def start_row(rows: List[Dict[str, Any]], method: str, bits: int, seed: int, steps: int, lr: float,
              backbone_lr_mult: float) -> Optional[Dict[str, Any]]:
    """The untuned run an end-to-end search starts from (pure): the last of ``rows`` (finetune_cpu.py's results)
    for (method, bits, seed) at ``steps`` steps with finetune_cpu.py's default lr and backbone multiplier, that
    is the method's shipped settings; None when there is none."""
    found = [r for r in rows if (r["method"], r["bits"], r["seed"], r["steps"]) == (method, bits, seed, steps)
             and r["lr"] == lr and r["backbone_lr_mult"] == backbone_lr_mult]
    return found[-1] if found else None


def start_settings(row: Dict[str, Any], protocol: Sequence[str]) -> List[str]:
    """A starting run's own settings (pure): its dataset, experiment and method settings, that is its overrides
    less the rest of the protocol's keys and its run's (``RUN_ONLY``)."""
    skip = ({o.split("=", 1)[0] for o in protocol} - {"dataset", "experiment"}) | set(RUN_ONLY)
    return [o for o in row["overrides"] if o.split("=", 1)[0] not in skip]


def with_start(entry: Dict[str, Any], row: Dict[str, Any], protocol: Sequence[str], source: str) -> Dict[str, Any]:
    """``entry`` (a search's choice) beside the method's starting run (pure): the start is recorded, and its
    settings become the choice when its validation MAP beats every trial's, so a search never ships settings
    that validate worse than the ones it started from."""
    start = {"file": source, "best_val_map": row["best_val_map"], "overrides": start_settings(row, protocol)}
    if row["best_val_map"] > entry["best_val_map"]:
        return dict(entry, overrides=start["overrides"], best_val_map=row["best_val_map"], trial="start",
                    start=start)
    return dict(entry, start=start)


def best_trial(records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    ok = [r for r in records if r["state"] == "finished" and r.get("history")]
    return max(ok, key=lambda r: r["history"][0]["best_val_map"]) if ok else None


def pool_rounds(entry: Dict[str, Any], out: str, pooled: List[Tuple[str, Dict[str, Any]]], method: str,
                bits: int) -> Dict[str, Any]:
    """This round's ``entry`` for (method, bits), or an earlier round's if its best validation MAP is higher;
    ``trials`` becomes the total over the rounds and ``rounds`` lists each round's file, best and trials."""
    rounds = [(out, entry)] + [(path, d[method][str(bits)]) for path, d in pooled
                               if str(bits) in d.get(method, {})]
    if len(rounds) == 1:
        return entry
    steps = {r["steps"] for _, r in rounds}
    if len(steps) > 1:
        raise SystemExit(f"--pool: {method} {bits} bits was tuned with different --steps {sorted(steps)}")
    path, best = max(rounds, key=lambda pr: pr[1]["best_val_map"])
    return dict(best, trials=sum(r["trials"] for _, r in rounds), seconds=sum(r["seconds"] for _, r in rounds),
                rounds=[{"file": Path(p).name, "best_val_map": r["best_val_map"], "trials": r["trials"],
                         "trial": r.get("trial")} for p, r in rounds],
                all=[t for _, r in rounds for t in r["all"]], chosen_from=Path(path).name)


def pooled_entries(pooled: List[Tuple[str, Dict[str, Any]]], method: str, bits: int) -> List[Dict[str, Any]]:
    """The ``--pool`` files' entries for (method, bits), in the files' order."""
    return [d[method][str(bits)] for _, d in pooled if str(bits) in d.get(method, {})]


def refine_sweep(sweep: Dict[str, Any], centre: Dict[str, Any], factor: float = 2.0) -> Dict[str, Any]:
    """A copy of ``sweep`` whose search space surrounds ``centre`` (the earlier rounds' best parameters).

    A parameter ``centre`` has a value for is fixed at it when it is categorical (``values``), searched
    in ``[v / factor, v * factor]`` when log-uniform and in ``v +- (max - min) / (2 * factor)`` when
    uniform, both clipped to the sweep file's own bounds. A parameter ``centre`` lacks (a knob added
    after those rounds) keeps its full specification.
    """
    params: Dict[str, Any] = {}
    for key, spec in sweep["parameters"].items():
        if key not in centre:
            params[key] = copy.deepcopy(spec)
            continue
        v, dist = centre[key], spec.get("distribution")
        if "values" in spec or "value" in spec:
            params[key] = {"value": v}
        elif dist == "log_uniform_values":
            params[key] = {"distribution": dist, "min": max(spec["min"], v / factor),
                           "max": min(spec["max"], v * factor)}
        elif dist == "uniform":
            half = (spec["max"] - spec["min"]) / (2 * factor)
            params[key] = {"distribution": dist, "min": max(spec["min"], v - half), "max": min(spec["max"], v + half)}
        else:
            raise SystemExit(f"--refine: {key}: no refinement for distribution {dist!r}")
    return dict(copy.deepcopy(sweep), parameters=params)


def refine_centre(entries: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The parameters ``--refine`` searches around, from the ``--pool`` files' entries for one (method, bits):
    a re-scored entry's choice (the best mean validation MAP over seeds), else the best trial's."""
    rescored = [e for e in entries if "rescored" in e]
    if rescored:
        e = max(rescored, key=lambda e: e["mean_val_map"])
        return next(c["params"] for c in e["rescored"] if c["overrides"] == e["overrides"])
    best = top_trials({"all": [t for e in entries for t in e.get("all", [])]}, 1)
    return best[0]["params"] if best else None


def trial_overrides(fixed: List[str], params: Dict[str, Any]) -> List[str]:
    """A trial's settings as ``results_cpu.py --tuned`` reads them: the sweep command's fixed overrides, then
    the swept values (the form an entry's ``overrides`` and every re-scored candidate's share, so they compare)."""
    return fixed + [f"{key}={value}" for key, value in params.items()]


def top_trials(entry: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """The ``k`` trials of ``entry["all"]`` with the highest validation MAP (failed trials left out)."""
    ok = [t for t in entry["all"] if t.get("best_val_map") is not None]
    return sorted(ok, key=lambda t: -t["best_val_map"])[:k]


def choose(entry: Dict[str, Any], candidates: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """``entry`` with its choice remade: the candidate with the best mean validation MAP (``overrides``, its
    search-seed ``best_val_map``, ``mean_val_map``), ``extra`` fields, and ``rescored`` = ``candidates``. When
    the choice changes, ``trial`` and ``chosen_from`` go: they named the entry's earlier choice."""
    best = max(candidates, key=lambda c: c["mean_val_map"])
    out = dict(entry, overrides=best["overrides"], best_val_map=best["val_maps"][0],
               mean_val_map=best["mean_val_map"], **extra, rescored=candidates)
    if best["overrides"] != entry["overrides"]:
        out.pop("trial", None)
        out.pop("chosen_from", None)
    return out


def scored_seeds(entry: Dict[str, Any]) -> List[int]:
    """The seeds a re-scored ``entry``'s candidates were scored with: the search seed, then the re-scoring seeds."""
    return [entry.get("seed", 0)] + list(entry.get("rescore_seeds", []))


def cached_runs(overrides: List[str], seeds: Sequence[int], run_seed, cache_path: Path,
                protocol: Sequence[str] = ()) -> List[Optional[float]]:
    """``run_seed(overrides, seed)`` (best validation MAP, None when the run failed) for every seed, each
    finished run kept in ``cache_path`` under the overrides, the ``protocol`` settings and the seed, so an
    interrupted job goes on where it stopped and a changed protocol is run again."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    maps = []
    for seed in seeds:
        key = json.dumps([overrides, list(protocol), seed])
        value = cache[key] if key in cache else run_seed(overrides, seed)
        if value is not None and key not in cache:  # a failed run is tried again next time
            cache[key] = value
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1))
        maps.append(value)
    return maps


def alternatives(entry: Dict[str, Any], sweep: Dict[str, Any], knobs: Sequence[str], seeds: List[int], run_seed,
                 fixed: List[str], cache_path: Path, protocol: Sequence[str] = ()) -> Dict[str, Any]:
    """``entry`` (a re-scored one) with its choice remade against variants of it: for each categorical knob in
    ``knobs``, the chosen settings with every other value the sweep file lists, each run with every seed in
    ``seeds`` (the search seed first, then the re-scoring seeds: the seeds the choice was scored with). A
    refined search fixes categorical knobs at the earlier best, so this is where another value gets its
    chance on the mean over seeds. The variants join ``rescored`` (marked ``"alternative": knob``)."""
    if "rescored" not in entry:
        raise SystemExit("--alternatives compares against a re-scored choice: give --rescore (or a --pool "
                         "file whose entries were re-scored)")
    chosen = next((c for c in entry["rescored"] if c["overrides"] == entry["overrides"]), None)
    if chosen is None:
        raise SystemExit("--alternatives: the entry's choice is not among its re-scored candidates")
    scored_with = scored_seeds(entry)
    if list(seeds) != scored_with:
        raise SystemExit(f"--alternatives: the choice was scored with seeds {scored_with}, not {list(seeds)}: "
                         "give the same --seed and --rescore-seeds")
    candidates = list(entry["rescored"])
    seen = {json.dumps(c["overrides"]) for c in candidates}
    for knob in knobs:
        spec = sweep["parameters"].get(knob, {})
        if "values" not in spec or knob not in chosen["params"]:
            raise SystemExit(f"--alternatives {knob}: not a categorical knob ('values') of the sweep file")
        for value in spec["values"]:
            if value == chosen["params"][knob]:
                continue
            params = dict(chosen["params"], **{knob: value})
            overrides = trial_overrides(fixed, params)
            if json.dumps(overrides) in seen:  # already a candidate (an earlier --alternatives run)
                continue
            seen.add(json.dumps(overrides))
            maps = cached_runs(overrides, seeds, run_seed, cache_path, protocol)
            if any(m is None for m in maps):
                continue
            candidates.append({"params": params, "overrides": overrides, "val_maps": maps,
                               "mean_val_map": sum(maps) / len(maps), "alternative": knob})
    return choose(entry, candidates, alternatives=list(knobs))


def sweep_fixed(command: Sequence[str], protocol: Sequence[str]) -> List[str]:
    """The sweep command's own ``key=value`` settings, as a trial's ``overrides`` record them: less those the
    ``protocol`` sets too (it comes after them and wins, so they would record nothing), except the config groups
    ``dataset`` and ``experiment``, which name what ran. So a command that spells out the protocol's features (for
    an online sweep) records the same overrides as one that leaves them to the protocol."""
    set_by_protocol = {o.split("=", 1)[0] for o in protocol}
    return [a for a in command if "=" in a and not a.startswith("${")
            and (a.split("=", 1)[0] in ("dataset", "experiment") or a.split("=", 1)[0] not in set_by_protocol)]


def rescore(entry: Dict[str, Any], k: int, seeds: List[int], run_seed, fixed: List[str],
            cache_path: Path, protocol: Sequence[str] = (),
            earlier: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """``entry`` with its choice remade from the ``k`` best trials, each run again with every seed in
    ``seeds`` (``run_seed(overrides, seed) -> best val MAP``, None when the run failed; finished runs are
    kept in ``cache_path`` under the trial's overrides, the ``protocol`` settings and the seed, so an
    interrupted rescoring goes on where it stopped and a changed protocol is run again). The chosen trial
    has the best mean over its recorded validation MAP and the new seeds'; ``rescored`` lists every
    candidate. ``earlier``: candidates an earlier round scored with the same seeds (its choice, and variants
    ``--alternatives`` added, which are no trials); they stay candidates, so a new round replaces the earlier
    choice only by beating it on the same seeds."""
    candidates = [dict(c) for c in earlier]
    seen = {json.dumps(c["overrides"]) for c in candidates}
    for trial in top_trials(entry, k):
        overrides = trial_overrides(fixed, trial["params"])
        if json.dumps(overrides) in seen:
            continue
        seen.add(json.dumps(overrides))
        maps = [trial["best_val_map"]] + cached_runs(overrides, seeds, run_seed, cache_path, protocol)
        if any(m is None for m in maps):
            continue  # a failed run: not a candidate
        candidates.append({"params": trial["params"], "overrides": overrides, "val_maps": maps,
                           "mean_val_map": sum(maps) / len(maps)})
    if not candidates:
        return entry
    out = choose(entry, candidates, rescore_seeds=seeds)
    knobs = sorted({c["alternative"] for c in candidates if "alternative" in c})
    if knobs:  # variants an earlier --alternatives added, carried as candidates
        out["alternatives"] = knobs
    else:
        out.pop("alternatives", None)
        out.pop("alternatives_seconds", None)
    return out


def earlier_candidates(entries: List[Dict[str, Any]], seeds: List[int], steps: int) -> List[Dict[str, Any]]:
    """The latest ``--pool`` entry's re-scored candidates when they were scored with ``seeds`` (search seed
    first) at ``steps``, for :func:`rescore`'s ``earlier``; none otherwise."""
    if not entries or "rescored" not in entries[-1]:
        return []
    e = entries[-1]
    same = scored_seeds(e) == list(seeds) and e.get("steps") == steps
    return [c for c in e["rescored"] if len(c["val_maps"]) == len(seeds)] if same else []


def search_round(args, method: str, bits: int, sweep: Dict[str, Any], base_file: Path, fixed: List[str],
                 sweep_dir: Path, pooled: List[Tuple[str, Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """One round of ``--count`` Bayesian trials for (method, bits) (around the pooled best with ``--refine``),
    pooled with the earlier rounds: the entry ``--out`` keeps, or None when no trial finished."""
    sweep_file = base_file
    if args.refine:
        centre = refine_centre(pooled_entries(pooled, method, bits))
        if centre is None:
            raise SystemExit(f"--refine: no finished {method} {bits}-bit trial in the --pool files")
        sweep_file = sweep_dir / f"{base_file.stem}_refine.yaml"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_file.write_text(yaml.safe_dump(refine_sweep(sweep, centre), sort_keys=False))
    kept = kept_state(getattr(args, "keep_dir", None), sweep_dir)
    restored = restore_search(kept, sweep_dir, sweep_file)
    if restored:
        print(f"{method} {bits} bits: continuing from the {restored} trials kept in {kept}", flush=True)

    def run_trial(overrides, out_dir, name):
        keep_search(kept, sweep_dir)  # the trials finished so far, before this one starts
        return train_in_process(overrides, out_dir, name)

    remaining = args.count - len(sweep_runs(sweep_dir))
    if remaining > 0:  # a search that reached --count earlier is only read
        run_sweep_local(sweep_file, count=remaining, overrides=protocol_overrides(args, bits),
                        output_dir=sweep_dir, seed=args.seed, run_fn=run_trial)
        keep_search(kept, sweep_dir)
    trials = sweep_runs(sweep_dir)[:args.count]
    best = best_trial(trials)
    if best is None:
        print(f"{method} {bits} bits: no finished trial", flush=True)
        return None
    params = {k: v["value"] for k, v in best["config"].items()}
    print(f"{method} {bits} bits: this round's best val MAP {best['history'][0]['best_val_map']:.4f} with {params}",
          flush=True)
    entry = {
        "overrides": trial_overrides(fixed, params),
        "best_val_map": best["history"][0]["best_val_map"], "trial": best["name"],
        "trials": len(trials), "steps": args.steps, "seed": args.seed,
        "seconds": round(sum(r.get("seconds") or 0 for r in trials), 1),  # the trials', over every call
        "all": [{"params": {k: v["value"] for k, v in r["config"].items()},
                 "best_val_map": (r["history"][0]["best_val_map"] if r.get("history") else None)}
                for r in trials],
    }
    return pool_rounds(entry, args.out, pooled, method, bits)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p)
    p.add_argument("--protocol", choices=["frozen", "finetune"], default="frozen",
                   help="frozen: heads on cached features (results_cpu.py); finetune: end to end (finetune_cpu.py), "
                        "searching each method's loss knobs, dropout, lr and backbone lr multiplier")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(set(SWEEPS) | set(FINETUNE_SWEEPS)),
                   help="default: every method of the protocol")
    p.add_argument("--bits", type=int, nargs="+", default=[12, 48], help="code lengths to tune at")
    p.add_argument("--count", type=int, default=16, help="Bayesian trials per (method, bits)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed of every trial")
    p.add_argument("--sweep-dir", default=None, help="default: runs/tune_cpu (frozen) or runs/tune_finetune")
    p.add_argument("--keep-dir", default=None,
                   help="folder where each search's trial records are copied before every trial, so a search "
                        "stopped with its checkout (runs/ gone) continues from its next trial; default "
                        "benchmarks/results/finetune_search (finetune), none (frozen)")
    p.add_argument("--start", default=None,
                   help="finetune: finetune_cpu.py's results whose untuned run (default lr and multiplier, --seed) of "
                        "each method and length is a candidate beside the trials; default "
                        "benchmarks/results/finetune_cpu.jsonl, '' for none")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/tuned_cpu.json (frozen) or finetune_cpu_recipe.json (finetune)")
    p.add_argument("--pool", nargs="*", default=[],
                   help="earlier rounds' --out files: each (method, bits) keeps the best validation trial over "
                        "all rounds (every method gets the same total budget when every round gives the same count)")
    p.add_argument("--refine", action="store_true",
                   help="search around the --pool files' best trial (refine_sweep) instead of the whole space")
    p.add_argument("--rescore", type=int, default=0, metavar="K",
                   help="run the K best (pooled) trials again with --rescore-seeds; choose by mean validation MAP")
    p.add_argument("--rescore-seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--alternatives", nargs="*", default=[], metavar="KNOB",
                   help="categorical knobs (e.g. data.sampling): try the re-scored choice with each other value "
                        "of each, with --seed and --rescore-seeds, and keep the best mean validation MAP; with "
                        "--count 0 and --pool, on the latest pool file's choice without a new search")
    args = p.parse_args(argv)
    finetune = args.protocol == "finetune"
    sweeps = FINETUNE_SWEEPS if finetune else SWEEPS
    args.methods = args.methods or list(sweeps)
    if set(args.methods) - set(sweeps):
        p.error(f"--protocol {args.protocol} tunes {list(sweeps)}, not {sorted(set(args.methods) - set(sweeps))}")
    args.sweep_dir = args.sweep_dir or str(REPO / "runs" / ("tune_finetune" if finetune else "tune_cpu"))
    if finetune and args.keep_dir is None:
        args.keep_dir = str(REPO / "benchmarks" / "results" / "finetune_search")
    args.out = args.out or str(REPO / "benchmarks" / "results" / ("finetune_cpu_recipe.json" if finetune else "tuned_cpu.json"))
    if args.rescore and args.seed in args.rescore_seeds:
        p.error(f"--rescore-seeds {args.rescore_seeds}: the trials already ran with --seed {args.seed}")
    if not args.count and not (args.pool and (args.rescore or args.alternatives)):
        p.error("--count 0 runs no search: give --rescore K and/or --alternatives KNOB, and the --pool files "
                "whose choice they remake")
    if not args.count and args.refine:
        p.error("--refine shapes a new search round, and --count 0 runs none")
    if args.alternatives and args.count and not args.rescore:
        p.error("--alternatives compares against a re-scored choice: give --rescore K too")
    if args.refine and not args.pool:
        p.error("--refine searches around the best trial of the --pool files: give them")
    starts: Dict[Tuple[str, int], Dict[str, Any]] = {}
    if finetune:
        if args.start is None:
            args.start = str(REPO / "benchmarks" / "results" / "finetune_cpu.jsonl")
        if args.start:
            ft = finetune_cpu.build_parser().parse_args([])
            rows = load_results(Path(args.start))
            missing = []
            for method in args.methods:
                for bits in args.bits:
                    row = start_row(rows, method, bits, args.seed, args.steps, ft.lr, ft.backbone_lr_mult)
                    if row is None:
                        missing.append((method, bits))
                    starts[method, bits] = row
            if missing:
                p.error(f"--start {args.start} has no untuned seed-{args.seed} run of "
                        + ", ".join(f"{m} at {b} bits" for m, b in missing)
                        + ": run each first (make bench-finetune FINETUNE_METHODS=\"...\" FINETUNE_ARGS=\"--bits "
                          "...\", before that method's searches change the recipe file), or pass --start ''")
    pooled = [(path, json.loads(Path(path).read_text())) for path in args.pool]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    tuned = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for method in args.methods:
        if finetune:  # the end-to-end space, written beside the trials (sweep-local reads a file)
            name, experiment, drop = FINETUNE_SWEEPS[method]
            sweep = finetune_sweep(load_sweep(resolve_sweep_path(name)), experiment, drop)
            base_file = Path(args.sweep_dir) / f"tune_{finetune_cpu.method_slug(method)}_finetune.yaml"
            base_file.parent.mkdir(parents=True, exist_ok=True)
            base_file.write_text(yaml.safe_dump(sweep, sort_keys=False))
        else:
            base_file = resolve_sweep_path(SWEEPS[method])
            sweep = load_sweep(base_file)
        for bits in args.bits:
            protocol = protocol_overrides(args, bits)
            fixed = sweep_fixed(sweep["command"], protocol)
            sweep_dir = Path(args.sweep_dir) / f"{finetune_cpu.method_slug(method)}-{bits}"

            def run_seed(overrides, seed, bits=bits, sweep_dir=sweep_dir):
                name = f"rescore-{hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:8]}-seed{seed}"
                seed_protocol = protocol_overrides(argparse.Namespace(**{**vars(args), "seed": seed}), bits)
                code, result = train_in_process(rescore_run(overrides, seed_protocol, sweep_dir, name), sweep_dir, name)
                return result.get("best_val_map") if code == 0 and result else None

            if args.count:
                entry = search_round(args, method, bits, sweep, base_file, fixed, sweep_dir, pooled)
                if entry is None:
                    continue
            else:  # no new trials: the latest --pool file's entry (for --alternatives)
                earlier = pooled_entries(pooled, method, bits)
                if not earlier:
                    raise SystemExit(f"--count 0: no {method} {bits}-bit entry in the --pool files")
                entry = dict(earlier[-1])
                if entry["steps"] != args.steps:
                    raise SystemExit(f"--count 0: {method} {bits} bits was tuned with --steps {entry['steps']}, "
                                     f"not {args.steps}")
            cache, seeds = sweep_dir / "rescore.json", [args.seed] + list(args.rescore_seeds)
            if args.rescore:
                earlier = earlier_candidates(pooled_entries(pooled, method, bits), seeds, args.steps)
                entry = rescore(entry, args.rescore, args.rescore_seeds, run_seed, fixed, cache, protocol, earlier)
            if args.alternatives:
                t1 = time.perf_counter()
                entry = alternatives(entry, sweep, args.alternatives, seeds, run_seed, fixed, cache, protocol)
                entry["alternatives_seconds"] = round(time.perf_counter() - t1, 1)
            if starts.get((method, bits)):
                entry = with_start(entry, starts[method, bits], protocol, repo_relative(Path(args.start)))
            entry["protocol"] = args.protocol
            tuned.setdefault(method, {})[str(bits)] = entry
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(tuned, indent=2))
            print(f"{method} {bits} bits: chosen {entry['overrides']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

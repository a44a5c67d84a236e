"""`hf-finetune compare`: one recipe trained once per method x seed through `train` (no second loop), then a table
(json, csv, markdown) and plots of quality against trainable parameters, time and memory.

Fairness: every method runs on the same data, data order (the seed drives the sampler) and evaluation set, each with
its own known-good defaults (each method's file under `hf_finetune/methods/`) unless overridden per method. A finished run whose results.json
carries the same recipe hash is reused, so an interrupted comparison continues where it stopped; a run that fails is
a row with its error and the others go on.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_finetune import compute_budget, lr_search
from hf_finetune.errors import InputError
from hf_finetune.methods import get_method
from hf_finetune.methods.registry import COMPARED_BY_DEFAULT
from hf_finetune.recipe import LrSearchConfig, Recipe, apply_override, read_recipe, recipe_from_dict
from hf_finetune.report import write_report
from hf_finetune.significance import paired_bootstrap, t_interval, verdict
from hf_finetune.tasks import TASKS

# columns of the per-run table, in order; every value comes from the run's results.json (or its model folder)
NUMBERS = (
    "trainable_params",
    "trainable_share",
    "final_trainable_params",
    "train_runtime_s",
    "train_samples_per_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "model_size_mb",
    "steps",
)


@dataclass
class Run:
    method: str
    seed: int
    recipe: Recipe
    out: Path
    raw: dict[str, Any] = field(default_factory=dict)  # the recipe as overrides edit it, before validation
    source: str = "recipe"  # where its errors point
    status: str = "planned"  # planned | reused | trained | failed
    error: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    forgetting: dict[str, Any] = field(default_factory=dict)

    def override(self, items: list[str], note: str) -> None:
        """This run with `items` (dotted overrides) applied: a new recipe, so a new hash."""
        for item in items:
            apply_override(self.raw, item)
        self.source = f"{self.source} ({note})"
        self.recipe = recipe_from_dict(copy.deepcopy(self.raw), source=self.source)

    def variant(self, items: list[str], out: Path, source: str) -> Run:
        """A short run derived from this one (an lr-search trial, a compute probe) into `out`, scored on validation
        only: it has no test split, which must stay unseen by what chooses settings."""
        raw = copy.deepcopy(self.raw)
        for item in items:
            apply_override(raw, item)
        raw["data"].pop("test", None)
        raw["output_dir"] = str(out)
        return Run(self.method, self.seed, recipe_from_dict(copy.deepcopy(raw), source), out, raw, source)


def plan(
    recipe_path: str,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    per_method: list[str] | tuple[str, ...] = (),
    budget_matched: bool = False,
) -> tuple[Recipe, list[Run]]:
    """The base recipe and one run per method x seed, each validated before anything trains."""
    raw = read_recipe(recipe_path)
    for item in overrides:
        apply_override(raw, item)
    base = recipe_from_dict(copy.deepcopy(raw), source=recipe_path)
    methods = methods or base.compare.methods or list(COMPARED_BY_DEFAULT)
    seeds = seeds or base.compare.seeds or [base.training.seed]
    sets: dict[str, list[str]] = {m: list(v) for m, v in base.compare.overrides.items()}
    for item in per_method:
        method, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise InputError(f"--set {item!r}: expected METHOD.dotted.key=value, e.g. lora.training.lr=3e-4")
        sets.setdefault(method, []).append(rest)
    unknown = sorted(set(sets) - set(methods))
    if unknown:
        raise InputError(f"per-method overrides for {unknown}, which are not among the methods {methods}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise InputError(f"methods {methods} and seeds {seeds} must not repeat")
    root = Path(base.output_dir)
    runs = []
    for method in methods:
        for seed in seeds:
            run_raw = copy.deepcopy(raw)
            run_raw.pop("compare", None)
            apply_override(run_raw, f"method.name={method}")
            apply_override(run_raw, f"training.seed={seed}")
            if budget_matched:
                for item in get_method(method).budget_overrides(base.method):
                    apply_override(run_raw, item)
            for item in sets.get(method, []):
                apply_override(run_raw, item)
            out = root / method / f"seed{seed}"
            run_raw["output_dir"] = str(out)
            source = f"{recipe_path} ({method}, seed {seed})"
            runs.append(Run(method, seed, recipe_from_dict(copy.deepcopy(run_raw), source), out, run_raw, source))
    return base, runs


def execute(runs: list[Run], train_fn: Any = None) -> None:
    """Train what is not finished yet; a failure is recorded on its run and the others go on."""
    if train_fn is None:
        train_fn = train_isolated
    for run in runs:
        finished = _finished(run)
        if finished is not None:
            run.status, run.results = "reused", finished
            continue
        print(f"hf-finetune compare: {run.method} seed {run.seed} -> {run.out}", file=sys.stderr, flush=True)
        try:
            train_fn(run.recipe)
            run.results = json.loads((run.out / "results.json").read_text())
            run.status = "trained"
        except Exception as err:  # one method failing must not stop the comparison
            run.status = "failed"
            run.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            run.out.mkdir(parents=True, exist_ok=True)
            (run.out / "error.txt").write_text(traceback.format_exc())
            print(f"hf-finetune compare: {run.method} seed {run.seed} failed: {run.error}", file=sys.stderr)


def _train_child(recipe: dict[str, Any]) -> None:
    from hf_finetune.engine import train

    # a run folder without a matching results.json holds a stale or interrupted run: replace it
    train(recipe_from_dict(recipe), overwrite=True)


def train_isolated(recipe: Recipe) -> None:
    """`train` in a fresh process: peak memory (the process's max RSS) and allocator state are then the run's own, not
    the maximum over every run before it, and a crash cannot take the comparison down."""
    run_isolated(_train_child, recipe.to_dict())


def run_isolated(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a fresh spawned process that ends with this one."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(
        1, initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        return pool.apply(fn, args)


def _die_with_parent(parent: int) -> None:
    """Pool initializer. A pool worker outlives a parent killed by SIGTERM or SIGKILL (Python's default SIGTERM exits
    without the pool's cleanup), and would go on training into the run folder on its own; Linux's PR_SET_PDEATHSIG
    has the kernel send it SIGTERM when the parent goes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _finished(run: Run) -> dict[str, Any] | None:
    path = run.out / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return results if results.get("recipe_hash") == run.recipe.run_hash() else None


def row(run: Run, primary: str, split: str = "validation") -> dict[str, Any]:
    """One run's figures, each read from its results.json (sizes from its model folder); its quality is `primary` on
    `split`."""
    r = run.results
    out: dict[str, Any] = {"method": run.method, "seed": run.seed, "status": run.status, "error": run.error}
    if run.status == "failed":
        return out
    for prefix, key in (("validation", "metrics"), ("test", "test_metrics")):
        for name, value in r.get(key, {}).items():
            out[f"{prefix}/{name}"] = value
    out["quality"] = r.get("metrics" if split == "validation" else "test_metrics", {}).get(primary)
    out["trainable_params"] = r["trainable_params"]
    out["trainable_share"] = r["trainable_params"] / r["total_params"]
    out["final_trainable_params"] = get_method(run.method).final_trainable(run.out / "model", r["trainable_params"])
    for key in ("train_runtime_s", "train_samples_per_s", "train_tokens_per_s", "peak_memory_mb", "steps"):
        out[key] = r[key]
    model_dir = run.out / "model"
    out["model_size_mb"] = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 2**20
    out["lr"] = r["recipe"]["training"]["lr"]
    if "increase" in run.forgetting:
        out["forgetting"] = run.forgetting["increase"]
        out["lm_loss_after"] = run.forgetting["after"]
    elif run.forgetting:
        out["forgetting_note"] = run.forgetting["not_measured"]
    return out


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: mean and standard deviation (n - 1) over its successful seeds of every numeric column."""
    summary = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        done = [r for r in mine if r["status"] != "failed"]
        entry: dict[str, Any] = {
            "method": method,
            "seeds": [r["seed"] for r in done],
            "failed": {r["seed"]: r["error"] for r in mine if r["status"] == "failed"},
        }
        keys = [k for k in (done[0] if done else {}) if isinstance(done[0][k], int | float) and k != "seed"]
        for key in keys:
            values = [float(r[key]) for r in done if r.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        qualities = [float(r["quality"]) for r in done if r.get("quality") is not None]
        if qualities:
            _, low, high = t_interval(qualities)
            entry["quality_ci"] = [low, high]
        summary.append(entry)
    return summary


def prediction_rows(run: Run, split: str = "validation") -> dict[str, dict] | None:
    """The run's saved predictions of `split`, keyed by example id (None where the run wrote none)."""
    path = run.out / "predictions" / f"{split}.jsonl"
    if run.status == "failed" or not path.is_file():
        return None
    return {json.dumps(r["id"]): r for r in map(json.loads, path.read_text().splitlines())}


def paired_against_best(
    task: str, runs: list[Run], summary: list[dict[str, Any]], primary: str, sign: float, split: str = "validation"
) -> list[dict[str, Any]]:
    """Every method against the best one (by mean quality): the paired bootstrap of the difference over the
    examples of `split` both scored, on the seeds both completed, and its verdict."""
    ranked = [s for s in summary if s.get("quality") is not None]
    if len(ranked) < 2:
        return []
    best = max(ranked, key=lambda s: sign * s["quality"])["method"]
    higher = sign > 0
    by_key = {(r.method, r.seed): r for r in runs}
    out = []
    for entry in ranked:
        name = entry["method"]
        if name == best:
            continue
        seeds = [seed for seed in entry["seeds"] if seed in next(s for s in ranked if s["method"] == best)["seeds"]]
        tables = {(m, seed): prediction_rows(by_key[(m, seed)], split) for m in (name, best) for seed in seeds}
        result: dict[str, Any] = {"method": name, "against": best, "metric": primary, "seeds": seeds}
        if not seeds or any(t is None for t in tables.values()):
            out.append({**result, "verdict": f"{name} vs {best}: no paired test (no saved predictions to pair)"})
            continue
        ids = sorted(set.intersection(*(set(t) for t in tables.values())))
        if any(primary in r.get("scores", {}) for t in tables.values() for r in t.values()):
            # a score only some rows carry (chat's generated sample): pair the rows that all runs scored
            ids = [i for i in ids if all(primary in t[i].get("scores", {}) for t in tables.values())]
        fns = {k: TASKS[task].resampled([t[i] for i in ids], primary) if ids else None for k, t in tables.items()}
        if any(f is None for f in fns.values()):
            out.append({**result, "verdict": f"{name} vs {best}: no paired test ({primary} is not recomputable from "
                        "per-example predictions)"})  # fmt: skip
            continue
        diff, low, high = paired_bootstrap([fns[(name, s)] for s in seeds], [fns[(best, s)] for s in seeds], len(ids))
        out.append({**result, "examples": len(ids), "difference": diff, "low": low, "high": high,
                    "verdict": verdict(name, best, primary, diff, low, high, higher)})  # fmt: skip
    return out


def pareto(points: list[tuple[str, float, float]]) -> set[str]:
    """Names on the front of (name, params, quality): no other point has fewer or equal params and higher or equal
    quality with one of the two strict."""
    front = set()
    for name, params, quality in points:
        dominated = any(
            p <= params and q >= quality and (p < params or q > quality) for n, p, q in points if n != name
        )
        if not dominated:
            front.add(name)
    return front


def environment(base: Recipe) -> dict[str, Any]:
    import torch

    from hf_finetune.system import choose_precision, versions

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        ]
        cpu = f"{names[0]} x {len(names)} logical cores" if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "precision": f"{base.training.precision} -> {choose_precision(base.training.precision)}",
        "versions": versions(),
    }


def measure_forgetting(base: Recipe, runs: list[Run], corpus: str) -> dict[str, Any]:
    """Each finished run's LM-loss increase on `corpus` (kept in its forgetting.json and reused while the run and
    the sample are the same), and the base model's loss before training."""
    from hf_finetune.checkpoint import write_json_atomic
    from hf_finetune.forgetting import Meter

    meter = Meter(base, corpus)
    for run in runs:
        if run.status == "failed":
            continue
        key = {"corpus": corpus, "paragraphs": len(meter.texts), "max_length": meter.max_length,
               "before": meter.before, "recipe_hash": run.results.get("recipe_hash")}  # fmt: skip
        cache = run.out / "forgetting.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:
            run.forgetting = cached["result"]
            continue
        run.forgetting = meter.measure(run.out)
        write_json_atomic(cache, {"key": key, "result": run.forgetting})
    return meter.header()


def quality_split(runs: list[Run], primary: str, searched: bool) -> str:
    """Where the table's quality comes from: validation, unless an lr search chose the rates on validation and every
    run has a test split to report unseen figures on."""
    done = [r for r in runs if r.status != "failed"]
    tested = done and all(primary in r.results.get("test_metrics", {}) for r in done)
    return "test" if searched and tested else "validation"


def write_outputs(
    base: Recipe, runs: list[Run], methods: list[str], command: str, primary: str, search: dict | None = None,
    forgetting: dict | None = None, compute: dict | None = None,
) -> dict[str, Path]:  # fmt: skip
    root = Path(base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    split = quality_split(runs, primary, search is not None)
    rows = [row(r, primary, split) for r in runs]
    summary = summarise(rows, methods)
    env = environment(base)
    # the front is taken on "better" quality: perplexity counts down
    sign = 1.0 if TASKS[base.task].higher_is_better(primary) else -1.0
    points = [
        (s["method"], s["trainable_params"], sign * s["quality"])
        for s in summary
        if s.get("quality") is not None
    ]
    front = pareto(points)
    data = {
        "command": command,
        "environment": env,
        "task": base.task,
        "primary_metric": primary,
        "quality_split": split,
        "pareto_front": sorted(front),
        "summary": summary,
        "paired": paired_against_best(base.task, runs, summary, primary, sign, split),
        **({"lr_search": search} if search is not None else {}),
        **({"forgetting": forgetting} if forgetting is not None else {}),
        **({"compute_budget": compute} if compute is not None else {}),
        "runs": rows,
    }
    paths = {
        "json": root / "comparison.json",
        "csv": root / "comparison.csv",
        "md": root / "comparison.md",
    }
    _atomic(paths["json"], json.dumps(data, indent=2, default=str))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = paths["csv"].with_name(f".{paths['csv'].name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, paths["csv"])
    _atomic(paths["md"], markdown(data, front))
    paths.update(plots(summary, primary, front, root, split, search))
    runs_done = {(r.method, r.seed): r.out for r in runs if r.status != "failed"}
    paths["html"] = write_report(data, runs_done, root / "report.html")
    return paths


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: Any, std: Any = None, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
        return text + (f" ± {std:.{digits}f}" if std else "")
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(data: dict[str, Any], front: set[str]) -> str:
    env, primary = data["environment"], data["primary_metric"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k != "device")
    lines = [
        f"# Method comparison: {data['task']}",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Environment: {env['cpu']}; GPU: {env['gpu'] or 'none'}; precision {env['precision']}; {versions}.",
        "",
        f"Quality is {data['quality_split']} `{primary}`; mean ± standard deviation over the seeds listed, and the 95% "
        "t-interval of that mean. Methods on the Pareto front of quality against trainable parameters are marked *.",
        "",
        f"| method | seeds | {primary} | 95% CI | trainable params | share | final trainable | train time (s) | "
        "samples/s | tokens/s | peak memory (MB) | model size (MB) | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budget = data.get("compute_budget")
    if budget:
        bought = ", ".join(f"{m} {e['steps']}" for m, e in budget["methods"].items())
        per = "seconds_per_step" if budget["kind"] == "time" else "tokens_per_step"
        cost = ", ".join(f"{m} {e[per]:,.3g}" for m, e in budget["methods"].items() if per in e)
        lines[-3:-3] = [
            "",
            f"Compute-matched: every method trained for {budget['amount']:,g} {budget['unit']}; the steps each bought, "
            f"from a {budget['probe_steps']}-step probe of it ({per.replace('_', ' ')}: {cost}): {bought}.",
        ]
    for s in data["summary"]:
        if not s["seeds"]:
            lines.append(f"| {s['method']} | failed: {'; '.join(s['failed'].values())} |" + " |" * 11)
            continue
        star = " *" if s["method"] in front else ""
        cells = [
            f"{s['method']}{star}",
            ",".join(map(str, s["seeds"])) + (f" (failed: {sorted(s['failed'])})" if s["failed"] else ""),
            _fmt(s.get("quality"), s.get("quality_std")),
            "[" + ", ".join(_fmt(v) for v in s["quality_ci"]) + "]" if None not in s.get("quality_ci", [None]) else "",
            _fmt(int(s["trainable_params"])),
            f"{100 * s['trainable_share']:.2f}%",
            _fmt(int(s["final_trainable_params"])),
            _fmt(s["train_runtime_s"], s.get("train_runtime_s_std"), 1),
            _fmt(s["train_samples_per_s"], None, 1),
            _fmt(s["train_tokens_per_s"], None, 0),
            _fmt(s["peak_memory_mb"], None, 0),
            _fmt(s["model_size_mb"], None, 2),
            _fmt(int(s["steps"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if data.get("paired"):
        lines += [
            "",
            "## Against the best method",
            "",
            f"Paired bootstrap over the {data['quality_split']} examples (10,000 resamples of the examples, the same for both "
            f"methods and every seed they share): the difference in `{primary}` and its 95% interval; an interval "
            "that holds 0 means the data cannot tell the two apart.",
            "",
            *[f"- {p['verdict']}" for p in data["paired"]],
        ]
    forgot = data.get("forgetting")
    if forgot:
        lines += ["", "## Forgetting", ""]
        if forgot["not_measured"]:
            lines.append(f"Not measured: {forgot['not_measured']}.")
        else:
            lines += [
                f"The base model's {forgot['objective']}-LM loss on {forgot['paragraphs']} paragraphs of "
                f"`{forgot['corpus']}`: {forgot['before']:.4f} before training; after, through each trained body with "
                "its method applied (mean over seeds; higher is more forgotten):",
                "",
                *[f"- {s['method']}: {s['forgetting']:+.4f}" for s in data["summary"] if s.get("forgetting") is not None],
                *[f"- {r['method']} seed {r['seed']}: not measured ({run_reason})" for r, run_reason in
                  ((r, r.get("forgetting_note")) for r in data["runs"]) if run_reason],
            ]  # fmt: skip
    search = data.get("lr_search")
    if search:
        lines += [
            "",
            "## Learning-rate search",
            "",
            f"Each method's rates trained on seed {search['seed']} for {100 * search['budget']:g}% of the run's steps "
            f"({search['rungs']} rung(s): each further rung keeps the better half and doubles the steps), scored on "
            "validation only; the comparison above then ran every seed at the chosen rate (**bold**).",
            "",
            "| method | its own lr | trials: lr (steps) = validation score | chosen |",
            "|---|---|---|---|",
        ]
        for name, entry in search["methods"].items():
            last = max((t["rung"] for t in entry["trials"]), default=0)
            trials = ", ".join(_trial_cell(t, entry["chosen"], last) for t in entry["trials"])
            chosen = f"{entry['chosen']:g}" if entry["chosen"] is not None else "none (every trial failed; its own lr)"
            lines.append(f"| {name} | {entry['center']:g} | {trials} | {chosen} |")
    lines += [
        "",
        "## Runs",
        "",
        f"| method | seed | status | {primary} | lr | train time (s) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['status']} | {_fmt(r.get('quality'))} | {_fmt(r.get('lr'), None, 6)} "
            f"| {_fmt(r.get('train_runtime_s'), None, 1)} | {r['error']} |"
        )
    pngs = ["quality_vs_params", "quality_vs_time", "memory"] + (["lr_search"] if search else [])
    lines += ["", "Plots: " + ", ".join(f"`{p}.png`" for p in pngs) + "; all of it in `report.html`.", ""]
    return "\n".join(lines)


def _trial_cell(trial: dict[str, Any], chosen: float | None, last_rung: int) -> str:
    score = _fmt(trial["score"]) if trial["score"] is not None else trial["status"]
    text = f"{trial['lr']:g} ({trial['steps']}) = {score}"
    return f"**{text}**" if trial["lr"] == chosen and trial["rung"] == last_rung else text


def plots(
    summary: list[dict[str, Any]], primary: str, front: set[str], root: Path, split: str = "validation",
    search: dict[str, Any] | None = None,
) -> dict[str, Path]:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on our machines
    import matplotlib.pyplot as plt

    done = [s for s in summary if s["seeds"] and s.get("quality") is not None]
    paths = {}

    def scatter(xkey: str, xlabel: str, name: str, log: bool, mark_front: bool) -> None:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for s in done:
            ax.errorbar(
                s[xkey], s["quality"], xerr=s.get(f"{xkey}_std") or None, yerr=s.get("quality_std") or None,
                fmt="o", capsize=3, label=s["method"],
            )  # fmt: skip
            ax.annotate(s["method"], (s[xkey], s["quality"]), textcoords="offset points", xytext=(5, 5))
        if mark_front:
            on = sorted((s[xkey], s["quality"]) for s in done if s["method"] in front)
            if on:
                # ringed points joined by a step line: a one-point front is still visible
                ax.plot(*zip(*on, strict=True), "--", color="grey", marker="o", markersize=14, fillstyle="none",
                        drawstyle="steps-post", label="Pareto front")  # fmt: skip
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{split} {primary}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[name] = root / f"{name}.png"
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)

    scatter("trainable_params", "trainable parameters (log)", "quality_vs_params", True, True)
    scatter("train_runtime_s", "train time (s)", "quality_vs_time", False, False)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.bar(
        [s["method"] for s in done], [s["peak_memory_mb"] for s in done],
        yerr=[s.get("peak_memory_mb_std") or 0 for s in done], capsize=3,
    )  # fmt: skip
    ax.set_ylabel("peak memory (MB)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["memory"] = root / "memory.png"
    fig.savefig(paths["memory"], dpi=120)
    plt.close(fig)
    if search:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for name, entry in search["methods"].items():
            for rung in sorted({t["rung"] for t in entry["trials"]}):
                points = [(t["lr"], t["score"]) for t in entry["trials"] if t["rung"] == rung and t["score"] is not None]
                if points:
                    ax.plot(*zip(*sorted(points), strict=True), marker="o", alpha=1.0 if rung else 0.8,
                            linestyle="-" if rung == 0 else ":", label=f"{name}" + (f" (rung {rung})" if rung else ""))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log)")
        ax.set_ylabel(f"validation {primary} (short trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["lr_search"] = root / "lr_search.png"
        fig.savefig(paths["lr_search"], dpi=120)
        plt.close(fig)
    return paths


def plan_schedule(recipe: Recipe, world: int | None = None) -> Any:
    """The schedule the engine's `setup` computes (`sampling.make_schedule`), without loading weights: the task's own rows (after packing or windowing)
    of the tokenised training split, over `world` processes (default: the launcher's)."""
    import tempfile

    from hf_finetune.data import load_splits
    from hf_finetune.device import padding_for_recipe
    from hf_finetune.hub import load_tokenizer, resolve_model
    from hf_finetune.sampling import make_schedule
    from hf_finetune.scratch import write_scratch_model
    from hf_finetune.tasks import get_task

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    task = get_task(recipe)
    raw = load_splits(dataclasses.replace(recipe.data, validation=None, test=None))
    task.prepare(raw)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = recipe.model.from_scratch
        if scratch is not None:  # the tokenizer the run would train (its model is built too, at random: small)
            texts = task.tokenizer_corpus(raw) if scratch.tokenizer is None else ()
            seed = recipe.training.seed
            path = str(write_scratch_model(Path(tmp), scratch.architecture, texts or (), scratch, seed, scratch.tokenizer))
        else:
            path = resolve_model(recipe.model.encoder_decoder_from or recipe.model.name_or_path, recipe.model.revision)
        task.setup(load_tokenizer(path, recipe), padding_for_recipe(recipe.training.precision, recipe.training.cpu_tuning))
        encoded = task.preprocess(raw)
    return make_schedule(len(encoded["train"]), recipe.training, world)


class StepCounter:
    """Optimizer steps of a run's recipe (`plan_schedule`), computed once per distinct input: runs differ in method
    and seed, rarely in what decides the step count."""

    def __init__(self) -> None:
        self.schedules: dict[str, Any] = {}

    def __call__(self, recipe: Recipe) -> int:
        t = recipe.training
        key = json.dumps([recipe.to_dict()[k] for k in ("task", "model", "data", "lm", "qa", "seq2seq")], default=str)
        key += json.dumps([t.batch_size, t.grad_accum, t.max_steps, t.epochs, t.max_length])
        if key not in self.schedules:
            self.schedules[key] = plan_schedule(recipe)
        return self.schedules[key].total_steps


def dry_run(base: Recipe, runs: list[Run], search: LrSearchConfig | None = None) -> str:
    """The plan: each run's method, seed, hyperparameters and optimizer steps (the engine's own count: the task's rows
    after packing or windowing, over the launcher's processes), and whether it would be reused; with an lr search,
    each method's first rung of trials before it."""
    steps_of = StepCounter()
    lines = []
    if search is not None:
        seeds = list(dict.fromkeys(r.seed for r in runs))
        lines.append(f"lr search on seed {search.seed if search.seed is not None else seeds[0]}, scored on validation "
                     f"({search.rungs} rung(s), each keeping the better half and doubling the steps):")  # fmt: skip
        for method in dict.fromkeys(r.method for r in runs):
            first = next(r for r in runs if r.method == method)
            total = steps_of(first.recipe)
            rates = ", ".join(f"{v:g}" for v in lr_search.grid(method, lr_search.center_lr(first.recipe), search))
            lines.append(f"  {method:8s} lr {rates} at {lr_search.trial_steps(total, search, 0)} of {total} steps")
        lines.append("then, at each method's chosen lr:")
    lines.append(f"{len(runs)} runs into {base.output_dir}")
    for run in runs:
        t = run.recipe.training
        steps = steps_of(run.recipe)
        method = get_method(run.method)
        params = {
            k: v for k, v in dataclasses.asdict(method.resolve(run.recipe.method, steps)).items()
            if v is not None and k != "name"
        }  # fmt: skip
        state = "reuse" if _finished(run) is not None and search is None else "train"
        lines.append(
            f"  {run.method:8s} seed {run.seed}: {state}, lr {t.lr or method.defaults['lr']:g}, batch {t.batch_size}"
            f" x {t.grad_accum}, {steps} steps, {params} -> {run.out}"
        )
    return "\n".join(lines)


def compare(
    recipe_path: str,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    per_method: list[str] | tuple[str, ...] = (),
    budget_matched: bool = False,
    search_lr: bool = False,
    forgetting: str | None = None,
    compute_matched: str | None = None,
    dry: bool = False,
    command: str | None = None,
    train_fn: Any = None,
) -> dict[str, Any]:
    base, runs = plan(recipe_path, methods, seeds, overrides, per_method, budget_matched)
    search = base.compare.lr_search or (LrSearchConfig() if search_lr else None)
    compute_text = compute_matched or base.compare.compute_matched
    compute = compute_budget.parse(compute_text) if compute_text else None
    corpus = forgetting or base.compare.forgetting
    if corpus:
        from hf_finetune.forgetting import corpus_texts

        corpus_texts(corpus, 1)  # a missing corpus fails now, not after every run has trained
    if dry:
        print(dry_run(base, runs, search))
        return {"runs": runs, "paths": {}}
    record = None
    if search is not None:
        record = lr_search.search(
            runs, search, list(dict.fromkeys(r.seed for r in runs)), Path(base.output_dir), base.task, StepCounter(),
            lambda batch: execute(batch, train_fn),
        )  # fmt: skip
        lr_search.apply_choice(runs, record)
    spent = None
    if compute is not None:
        spent = compute_budget.apply(runs, compute, Path(base.output_dir), lambda batch: execute(batch, train_fn))
    execute(runs, train_fn)
    forgot = measure_forgetting(base, runs, corpus) if corpus else None
    # the task's ranking metric as the runs report it: a classification run's depends on its labels (accuracy,
    # multi-label micro-F1, regression Pearson)
    reported = [r.results.get("primary_metric") for r in runs]
    primary = next((m for m in reported if m), TASKS[base.task].primary_metric)
    command = command or "hf-finetune compare " + shlex.join(sys.argv[2:])
    method_names = list(dict.fromkeys(r.method for r in runs))
    paths = write_outputs(base, runs, method_names, command, primary, record, forgot, spent)
    return {"paths": paths, "runs": runs}

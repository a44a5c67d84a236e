"""`output_dir/report.html` of a comparison: one self-contained page (it opens from disk and loads nothing from the
network) with the command and environment, the summary with confidence intervals and paired verdicts, and
interactive charts (hover a point for its run's numbers): the lr search, quality against trainable parameters with
the Pareto front, quality against time, memory, forgetting and the training-loss curves.

The charts are Vega-Lite specs rendered by the Vega, Vega-Lite and Vega-Embed bundle that vl-convert ships, inlined
once into the page; a Content-Security-Policy forbids every network load, so a page that tried one would fail to
render rather than quietly depend on the internet.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Any

# nothing but the page's own inline scripts and styles; vega compiles its expressions with Function()
POLICY = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)

# what would otherwise only reach the console, kept on the <html> element for a headless browser to read
CAPTURE = """
const reportErrors = [];
document.documentElement.dataset.errors = '[]';
function reportError(message) {
  reportErrors.push(String(message));
  document.documentElement.dataset.errors = JSON.stringify(reportErrors);
}
addEventListener('error', e => reportError(e.message || e));
addEventListener('unhandledrejection', e => reportError(e.reason));
addEventListener('securitypolicyviolation', e => reportError('blocked ' + e.blockedURI));
const consoleError = console.error;
console.error = (...args) => { reportError(args.join(' ')); consoleError(...args); };
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
code { background: #f4f4f4; padding: 0.1em 0.3em; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
.chart h3 { margin: 0.5em 0; font-size: 1em; }
.note { color: #555; font-size: 0.9em; }
"""


@functools.cache
def vega_bundle() -> str:
    import vl_convert

    return vl_convert.javascript_bundle()


def write_report(data: dict[str, Any], run_dirs: dict[tuple[str, int], Path], path: Path) -> Path:
    """The page for `data` (comparison.json's content); `run_dirs` maps (method, seed) to its run folder for the
    loss curves."""
    charts = specs(data, run_dirs)
    body = "\n".join([
        f"<h1>Method comparison: {_e(data['task'])}</h1>",
        f"<p>Command: <code>{_e(data['command'])}</code></p>",
        f"<p class='note'>{_e(environment_line(data['environment']))}</p>",
        summary_table(data),
        verdicts(data),
        "<h2>Charts</h2><p class='note'>Hover a point for its run's numbers.</p><div class='charts'>",
        *[f"<div class='chart'><h3>{_e(title)}</h3><div id='chart{i}'></div></div>" for i, (title, _) in enumerate(charts)],
        "</div>",
        search_table(data),
        runs_table(data),
    ])  # fmt: skip
    embed = ",\n".join(
        f"vegaEmbed('#chart{i}', {_js(spec)}, {{mode: 'vega-lite', renderer: 'svg', actions: false}})"
        for i, (_, spec) in enumerate(charts)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<title>Method comparison: {_e(data['task'])}</title>
<script>{CAPTURE}</script>
<style>{STYLE}</style>
<script>{vega_bundle()}</script>
</head><body>
{body}
<script>
Promise.all([
{embed}
]).then(views => {{ document.documentElement.dataset.rendered = String(views.length); }}).catch(reportError);
</script>
</body></html>
"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def _e(value: Any) -> str:
    return html.escape(str(value))


def _js(spec: dict[str, Any]) -> str:
    """A spec as a JavaScript literal inside <script>: JSON, with `</` broken so that no string closes the tag."""
    return json.dumps(spec).replace("</", "<\\/")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def environment_line(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k != "device")
    return f"{env['cpu']}; GPU: {env['gpu'] or 'none'}; precision {env['precision']}; {versions}"


def summary_table(data: dict[str, Any]) -> str:
    primary, split = data["primary_metric"], data["quality_split"]
    paired = {p["method"]: p for p in data.get("paired", [])}
    best = next((p["against"] for p in data.get("paired", [])), None)
    head = ["method", "lr", "seeds", f"{split} {primary}", "95% CI", "against the best", "trainable params", "share",
            "train time (s)", "peak memory (MB)", "model size (MB)"]  # fmt: skip
    rows = []
    for s in data["summary"]:
        if not s["seeds"]:
            rows.append([s["method"], "", "failed: " + "; ".join(s["failed"].values())] + [""] * 8)
            continue
        if s["method"] == best:
            against = "best"
        elif s["method"] in paired and "difference" in paired[s["method"]]:
            p = paired[s["method"]]
            against = f"{p['difference']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]"
        else:
            against = paired.get(s["method"], {}).get("verdict", "")
        ci = s.get("quality_ci") or [None, None]
        rows.append([
            s["method"] + (" *" if s["method"] in data["pareto_front"] else ""),
            f"{s['lr']:g}" if s.get("lr") is not None else "",
            ",".join(map(str, s["seeds"])),
            _num(s.get("quality")) + (f" ± {s['quality_std']:.4f}" if s.get("quality_std") else ""),
            f"[{_num(ci[0])}, {_num(ci[1])}]" if None not in ci else "",
            against,
            _num(int(s["trainable_params"])),
            f"{100 * s['trainable_share']:.2f}%",
            _num(s["train_runtime_s"], 1),
            _num(s["peak_memory_mb"], 0),
            _num(s["model_size_mb"], 2),
        ])  # fmt: skip
    note = (f"<p class='note'>Mean ± standard deviation of {split} <code>{_e(primary)}</code> over the seeds, and the "
            "95% t-interval of the mean; the paired difference to the best method with its 95% bootstrap interval. "
            "* marks the Pareto front of quality against trainable parameters.</p>")  # fmt: skip
    return "<h2>Summary</h2>" + note + _table(head, rows)


def verdicts(data: dict[str, Any]) -> str:
    if not data.get("paired"):
        return ""
    items = "".join(f"<li>{_e(p['verdict'])}</li>" for p in data["paired"])
    return f"<h2>Against the best method</h2><ul>{items}</ul>"


def search_table(data: dict[str, Any]) -> str:
    search = data.get("lr_search")
    if not search:
        return ""
    rows = []
    for name, entry in search["methods"].items():
        for t in entry["trials"]:
            rows.append([name, f"{t['lr']:g}", str(t["rung"]), str(t["steps"]),
                         _num(t["score"]) if t["score"] is not None else t["status"],
                         "chosen" if t["lr"] == entry["chosen"] else ""])  # fmt: skip
    note = (f"<p class='note'>Trials on seed {search['seed']}, {100 * search['budget']:g}% of the steps, "
            f"{search['rungs']} rung(s), scored on validation only.</p>")  # fmt: skip
    return "<h2>Learning-rate search</h2>" + note + _table(["method", "lr", "rung", "steps", "score", ""], rows)


def runs_table(data: dict[str, Any]) -> str:
    head = ["method", "seed", "status", data["primary_metric"], "lr", "steps", "train time (s)", "error"]
    rows = [
        [r["method"], str(r["seed"]), r["status"], _num(r.get("quality")), f"{r['lr']:g}" if r.get("lr") else "",
         _num(r.get("steps")), _num(r.get("train_runtime_s"), 1), r["error"]]
        for r in data["runs"]
    ]  # fmt: skip
    return "<h2>Runs</h2>" + _table(head, rows)


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def specs(data: dict[str, Any], run_dirs: dict[tuple[str, int], Path]) -> list[tuple[str, dict[str, Any]]]:
    """(title, Vega-Lite spec) of every chart the data supports."""
    primary, split = data["primary_metric"], data["quality_split"]
    y_title = f"{split} {primary}"
    done = [s for s in data["summary"] if s["seeds"] and s.get("quality") is not None]
    means = [{"method": s["method"], "quality": s["quality"], "low": (s.get("quality_ci") or [s["quality"]] * 2)[0],
              "high": (s.get("quality_ci") or [s["quality"]] * 2)[1], "trainable_params": s["trainable_params"],
              "train_runtime_s": s["train_runtime_s"], "peak_memory_mb": s["peak_memory_mb"],
              "seeds": len(s["seeds"])} for s in done]  # fmt: skip
    runs = [r for r in data["runs"] if r.get("quality") is not None]
    color = {"field": "method", "type": "nominal"}
    charts = []
    search = data.get("lr_search")
    if search:
        trials = [{"method": m, "lr": t["lr"], "score": t["score"], "rung": t["rung"], "steps": t["steps"]}
                  for m, e in search["methods"].items() for t in e["trials"] if t["score"] is not None]  # fmt: skip
        charts.append(("Learning-rate search (validation, short trials)", {
            "width": 480, "height": 300, "data": {"values": trials},
            "mark": {"type": "line", "point": True},
            "encoding": {
                "x": {"field": "lr", "type": "quantitative", "scale": {"type": "log"}, "title": "learning rate"},
                "y": {"field": "score", "type": "quantitative", "scale": {"zero": False}, "title": f"validation {primary}"},
                "color": color, "strokeDash": {"field": "rung", "type": "ordinal"},
                "detail": {"field": "rung"},
                "tooltip": [{"field": f} for f in ("method", "lr", "rung", "steps", "score")],
            },
        }))  # fmt: skip
    for key, title, log in (("trainable_params", "trainable parameters", True), ("train_runtime_s", "train time (s)", False)):
        x = {"field": key, "type": "quantitative", "title": title, "scale": {"type": "log"} if log else {"zero": False}}
        y = {"field": "quality", "type": "quantitative", "scale": {"zero": False}, "title": y_title}
        layers = [
            {"data": {"values": runs}, "mark": {"type": "point", "opacity": 0.45},
             "encoding": {"x": x, "y": y, "color": color,
                          "tooltip": [{"field": f} for f in ("method", "seed", "quality", key, "lr")]}},
            {"data": {"values": means}, "mark": "rule",
             "encoding": {"x": x, "y": {**y, "field": "low"}, "y2": {"field": "high"}, "color": color}},
            {"data": {"values": means}, "mark": {"type": "point", "filled": True, "size": 90},
             "encoding": {"x": x, "y": y, "color": color,
                          "tooltip": [{"field": f} for f in ("method", "quality", "low", "high", key, "seeds")]}},
        ]  # fmt: skip
        if log:
            front = sorted((m for m in means if m["method"] in data["pareto_front"]), key=lambda m: m[key])
            layers.append({"data": {"values": front}, "mark": {"type": "line", "strokeDash": [4, 4], "color": "grey",
                           "interpolate": "step-after"}, "encoding": {"x": x, "y": y}})  # fmt: skip
        name = "Quality against trainable parameters (Pareto front dashed)" if log else "Quality against train time"
        charts.append((f"{name}; means with 95% CI, seeds faint", {"width": 480, "height": 300, "layer": layers}))
    charts.append(("Peak memory", bars(means, "peak_memory_mb", "peak memory (MB)", ".0f")))
    forgetting = [{"method": s["method"], "increase": s["forgetting"]} for s in done if s.get("forgetting") is not None]
    if forgetting:
        charts.append(("Forgetting: increase of the general-text LM loss",
                       bars(forgetting, "increase", "LM loss after - before", ".4f")))  # fmt: skip
    curves = loss_curves(run_dirs)
    if curves:
        charts.append(("Training loss", {
            "width": 480, "height": 300, "data": {"values": curves}, "mark": "line",
            "encoding": {"x": {"field": "step", "type": "quantitative"},
                         "y": {"field": "loss", "type": "quantitative", "scale": {"zero": False}},
                         "color": color, "detail": {"field": "seed"},
                         "tooltip": [{"field": f} for f in ("method", "seed", "step", "loss")]},
        }))  # fmt: skip
    return charts


def bars(values: list[dict[str, Any]], field: str, title: str, number: str) -> dict[str, Any]:
    """One bar per method, in the summary's order."""
    return {
        "width": 480, "height": 300, "data": {"values": values}, "mark": "bar",
        "encoding": {"x": {"field": "method", "type": "nominal", "sort": None},
                     "color": {"field": "method", "type": "nominal"},
                     "y": {"field": field, "type": "quantitative", "title": title},
                     "tooltip": [{"field": "method"}, {"field": field, "format": number}]},
    }  # fmt: skip


def loss_curves(run_dirs: dict[tuple[str, int], Path]) -> list[dict[str, Any]]:
    """The logged training loss of every run (its metrics.jsonl lines that carry one)."""
    points = []
    for (method, seed), folder in run_dirs.items():
        path = folder / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry:
                points.append({"method": method, "seed": seed, "step": entry["step"], "loss": entry["loss"]})
    return points

"""compare's report.html: written by every comparison, self-contained (its Content-Security-Policy forbids any network
load) and rendered by a headless Chromium with every chart drawn and no error; the check itself catches a page that
loads from the network or throws."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import sentences, tiny_recipe, write_jsonl

import hf_finetune.engine as engine
from hf_finetune.compare import compare
from hf_finetune.report import POLICY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags that keep Chromium off the (closed) network at start-up: no sync, no component updates, no QUIC
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--virtual-time-budget=20000"]  # fmt: skip


def render(page: Path, profile: Path) -> tuple[int, list[str]]:
    """How many charts the page reports drawn, and the errors it caught (script errors, rejected promises,
    console.error, loads the policy blocked), read off the <html> element of the DOM Chromium dumps once the page
    settled."""
    if CHROMIUM is None:
        if os.environ.get("CI"):  # .ci/run installs Debian's chromium: in CI the check must run
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    root = re.search(r"<html([^>]*)>", done.stdout)
    assert root, done.stderr[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', root.group(1)))
    return int(attrs.get("rendered", 0)), json.loads(html.unescape(attrs.get("errors", '["no script ran"]')))


@pytest.fixture(scope="module")
def report(tiny_bert_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-method, two-seed comparison with an lr search (in this process: the page is what is under test)."""
    root = tmp_path_factory.mktemp("report")
    write_jsonl(root / "train.jsonl", sentences(256, seed=1))
    write_jsonl(root / "validation.jsonl", sentences(64, seed=2))
    raw = tiny_recipe(tiny_bert_pretrained, root, root / "cmp", **{"training.max_steps": 4, "training.logging_every": 1})
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps(raw))
    search = ["compare.lr_search.lrs.full=[1e-4,1e-3]", "compare.lr_search.lrs.lora=[1e-3,1e-2]"]
    compare(str(recipe), ["full", "lora"], [1, 2], overrides=search, train_fn=lambda r: engine.train(r, overwrite=True))
    return root / "cmp" / "report.html"


def test_the_report_renders_every_chart_offline_without_errors(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    assert f'content="{POLICY}"' in page and "default-src 'none'" in POLICY
    data = json.loads((report.parent / "comparison.json").read_text())
    # what a reader looks for: each method's chosen lr, its mean and interval, its verdict against the best
    for s in data["summary"]:
        assert f"{s['lr']:g}" in page and f"{s['quality']:,.4f}" in page
        assert f"[{s['quality_ci'][0]:,.4f}, {s['quality_ci'][1]:,.4f}]" in page
    assert html.escape(data["paired"][0]["verdict"]) in page
    # lr search, quality vs parameters, quality vs time, memory, training loss
    assert render(report, tmp_path / "profile") == (5, [])


def test_the_check_catches_a_network_load_and_a_script_error(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    broken = tmp_path / "broken.html"
    head, tail = page.rsplit("</body>", 1)  # the page's own closing tag (the inlined bundle holds the string too)
    broken.write_text(head + '<img src="http://example.invalid/x.png"><script>noSuchFunction()</script></body>' + tail)
    rendered, errors = render(broken, tmp_path / "profile")
    assert rendered == 5
    assert any("blocked http://example.invalid/x.png" in e for e in errors), errors
    assert any("noSuchFunction" in e for e in errors), errors

"""A catalogue of bad inputs: each exits with code 2 and one line naming the file, key or row, and leaves output_dir
exactly as it was (not created when it did not exist; every file byte- and mtime-identical when it did, even with
--overwrite, which must only act once every check has passed). Task-specific cases live beside their tasks' tests
(tests/test_seq2seq.py, tests/test_question_answering.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_jsonl
from transformers import BertTokenizer, DistilBertConfig, DistilBertModel

from hf_finetune.cli import main


@dataclass
class Ctx:
    tmp: Path
    recipe: Path
    out: Path
    data: Path
    model: Path
    distilbert: Path
    extra: list[str] = field(default_factory=list)


def snapshot(root: Path) -> dict[str, tuple] | None:
    """Every path under `root` with its content hash and mtime; None when root does not exist."""
    if not root.exists():
        return None
    if root.is_file():
        return {".": (hashlib.sha256(root.read_bytes()).hexdigest(), root.stat().st_mtime_ns)}
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            found[rel] = ("dir",)
        else:
            found[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return found


def fake_prior_run(out: Path) -> None:
    """What a finished run leaves behind, written by hand: these tests only need it to stay untouched."""
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002" / "trainer_state.json").write_text('{"step": 2}')
    (out / "model").mkdir()
    (out / "model" / "hf_finetune.json").write_text("{}")
    (out / "results.json").write_text('{"metrics": {"accuracy": 0.5}}')
    (out / "metrics.jsonl").write_text('{"step": 2, "loss": 0.7}\n')
    (out / "recipe.resolved.json").write_text("{}")


@pytest.fixture(scope="module")
def tiny_distilbert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DistilBERT-shaped model: its attention takes no key/value cache, so prefix tuning cannot work on it."""
    folder = tmp_path_factory.mktemp("tiny-distilbert")
    tokenizer = BertTokenizer.from_pretrained(tiny_bert)
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        n_layers=1,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def ctx(tiny_bert: Path, tiny_distilbert: Path, data_dir: Path, tmp_path: Path) -> Ctx:
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_bert, data_dir, out, **{"method.name": "full", "training.max_steps": 2})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return Ctx(tmp_path, recipe, out, data_dir, tiny_bert, tiny_distilbert)


def train(c: Ctx, *overrides: str) -> list[str]:
    return ["train", str(c.recipe), *overrides]


def rows_with(c: Ctx, name: str, index: int, **changes: object) -> Path:
    """A copy of the training rows with row `index` changed."""
    rows = [json.loads(line) for line in (c.data / "train.jsonl").read_text().splitlines()]
    rows[index].update(changes)
    return write_jsonl(c.tmp / name, rows)


def custom_code_model(c: Ctx) -> Path:
    folder = c.tmp / "custom-model"
    folder.mkdir()
    config = {
        "model_type": "tiny-custom",
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModel": "modeling_tiny.TinyModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_tiny.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def resume_without_checkpoints(c: Ctx) -> list[str]:
    shutil.rmtree(c.out / "checkpoints")  # a run killed before its first checkpoint
    return train(c, "training.resume=true")


def pickle_only_model(c: Ctx) -> Path:
    """The tiny model with its weights as a pickle instead of safetensors."""
    folder = c.tmp / "pickled-model"
    shutil.copytree(c.model, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def bytes_file(c: Ctx, name: str, content: bytes) -> Path:
    (c.tmp / name).write_bytes(content)
    return c.tmp / name


# id -> (build the argv, substrings the one error line must hold, a prior run in output_dir?)
def qa_split(c: Ctx, name: str, shift: int = 0) -> Path:
    """SQuAD-layout rows; `shift` moves the second answer's answer_start off its text."""
    rows = [
        {"id": f"q{i}", "question": "where", "context": "the cat sat on the mat", "answers": {"text": ["mat"], "answer_start": [19]}}
        for i in range(4)
    ]  # fmt: skip
    rows[1]["answers"]["answer_start"] = [19 + shift]
    return write_jsonl(c.tmp / name, rows)


def qa(c: Ctx, *overrides: str, shift: int = 0) -> list[str]:
    return train(
        c, "task=question_answering", f"data.train.path={qa_split(c, 'qa_train.jsonl', shift)}",
        f"data.validation.path={qa_split(c, 'qa_val.jsonl')}", *overrides,
    )  # fmt: skip


CASES: dict[str, tuple[Callable[[Ctx], list[str]], list[str], bool]] = {
    "missing_data_file": (
        lambda c: train(c, "data.train.path=/no/such/train.jsonl"), ["data.train.path", "/no/such/train.jsonl", "not found"], False,
    ),
    "unreadable_format": (
        lambda c: train(c, f"data.train.path={bytes_file(c, 'train.xlsx', b'PK')}"), ["train.xlsx", "cannot read files of type .xlsx"], False,
    ),
    "corrupt_jsonl": (
        lambda c: train(c, f"data.train.path={bytes_file(c, 'broken.jsonl', b'{not json')}"), ["broken.jsonl", "cannot be parsed as json"], False,
    ),
    "empty_split": (
        lambda c: train(c, f"data.validation.path={bytes_file(c, 'empty.jsonl', b'')}"), ["data.validation", "split is empty"], False,
    ),
    "missing_column_lists_existing": (
        lambda c: train(c, "data.columns.text=body"), ["data.columns.text='body' not found", "the split has sentence, label"], False,
    ),
    "validation_label_not_in_train": (
        lambda c: train(c, f"data.validation.path={write_jsonl(c.tmp / 'v.jsonl', [{'sentence': 'ok film', 'label': 'meh'}])}"),
        ["data.validation row 0", "'meh'", "not among the training labels"], False,
    ),
    "null_text": (
        lambda c: train(c, f"data.train.path={rows_with(c, 'null.jsonl', 5, sentence=None)}"), ["data.train row 5", "'sentence'"], False,
    ),
    "blank_text": (
        lambda c: train(c, f"data.train.path={rows_with(c, 'blank.jsonl', 7, sentence='  ')}"), ["data.train row 7", "'sentence'"], False,
    ),
    "null_label": (
        lambda c: train(c, f"data.train.path={rows_with(c, 'nolabel.jsonl', 3, label=None)}"), ["data.train row 3", "label"], False,
    ),
    "non_utf8_csv": (
        lambda c: train(c, f"data.train.path={bytes_file(c, 'latin1.csv', b'sentence,label' + bytes([10]) + b'good,pos' + bytes([10]) + b'caf' + bytes([0xE9]) + b',neg' + bytes([10]))}"),
        ["latin1.csv line 3", "not UTF-8", "0xe9"], False,
    ),
    "non_utf8_jsonl": (
        lambda c: train(c, f"data.train.path={bytes_file(c, 'bad.jsonl', b'{' + bytes([0xFF]) + b'}')}"), ["bad.jsonl line 1", "not UTF-8"], False,
    ),
    "early_stopping_without_evaluations": (
        lambda c: train(c, "training.early_stopping_patience=2"),
        ["'training.early_stopping_patience'", "training.eval_every"], False,
    ),
    "best_at_end_with_unscored_checkpoints": (
        lambda c: train(c, "training.load_best_at_end=true", "training.eval_every=4", "training.save_every=6"),
        ["'training.save_every'", "not a multiple of training.eval_every (4)"], False,
    ),
    "unknown_task": (lambda c: train(c, "task=clasification"), ["'task'", "did you mean 'classification'"], False),
    "unknown_method": (lambda c: train(c, "method.name=lorra"), ["'method.name'", "did you mean 'lora'"], False),
    "unknown_key": (lambda c: train(c, "training.lrr=1e-3"), ["unknown key 'training.lrr'", "did you mean 'training.lr'"], False),
    "prefix_on_distilbert": (
        lambda c: train(c, f"model.name_or_path={c.distilbert}", "method.name=prefix"), ["prefix", "DistilBert", "cache"], False,
    ),
    "max_length_over_positions": (
        lambda c: train(c, "training.max_length=512"), ["training.max_length", "512", "64 positions"], False,
    ),
    "batch_size_zero": (lambda c: train(c, "training.batch_size=0"), ["'training.batch_size'", "positive"], False),
    "negative_lr": (lambda c: train(c, "training.lr=-1e-3"), ["'training.lr'", "must be positive"], False),
    "output_dir_is_file": (
        lambda c: train(c, f"output_dir={bytes_file(c, 'a-file', b'x')}"), ["output_dir", "a-file", "is a file"], False,
    ),
    "output_dir_holds_another_run": (lambda c: train(c), ["output_dir", "already holds a run", "--overwrite"], True),
    "resume_path_not_a_checkpoint": (
        lambda c: train(c, f"training.resume={c.data}"), ["training.resume", "is not a checkpoint"], True,
    ),
    "resume_with_no_checkpoint": (
        lambda c: resume_without_checkpoints(c),
        ["training.resume", "no complete checkpoint", "--overwrite"], True,
    ),
    "eval_checkpoint_not_a_checkpoint": (
        lambda c: ["eval", str(c.recipe), f"checkpoint={c.data}"], ["checkpoint", "holds no hf_finetune.json"], True,
    ),
    "recipe_not_yaml": (
        lambda c: ["train", str(bytes_file(c, "recipe.yml", b"task: [classification\nmodel: {")), f"output_dir={c.out}"],
        ["recipe.yml", "not valid YAML"], True,
    ),
    "recipe_not_a_mapping": (
        lambda c: ["train", str(bytes_file(c, "list.yaml", b"- task\n- model\n")), f"output_dir={c.out}"],
        ["list.yaml", "mapping"], True,
    ),
    "remote_code_not_trusted": (
        lambda c: train(c, f"model.name_or_path={custom_code_model(c)}", "--overwrite"), ["model.trust_remote_code"], True,
    ),
    "pickled_weights_only": (
        lambda c: train(c, f"model.name_or_path={pickle_only_model(c)}"), ["model.name_or_path", "no *.safetensors"], False,
    ),
    "qa_answer_not_at_answer_start": (
        lambda c: qa(c, "qa.doc_stride=8", shift=2), ["data.train row 1 (id 'q1')", "not at answer_start 21", "qa.misaligned_answers=drop"], False,
    ),
    "qa_doc_stride_not_below_max_length": (
        lambda c: qa(c, "training.max_length=32", "qa.doc_stride=32"), ["qa.doc_stride", "training.max_length"], False,
    ),
    "model_folder_missing": (
        lambda c: train(c, "model.name_or_path=/no/such/model"), ["model.name_or_path", "/no/such/model", "no folder"], False,
    ),
    "model_relative_folder_missing": (
        lambda c: train(c, "model.name_or_path=runs/no-such-run"), ["model.name_or_path", "runs/no-such-run", "no folder"], False,
    ),
    "best_metric_misspelt": (
        lambda c: train(c, "training.best_metric=acuracy", "--overwrite"), ["'training.best_metric'", "did you mean 'accuracy'"], True,
    ),
    "best_metric_of_another_task": (
        lambda c: train(c, "training.best_metric=perplexity"), ["'training.best_metric'", "not a classification metric"], False,
    ),
    "cpu_tuning_not_a_choice": (
        lambda c: train(c, "training.cpu_tuning=maybe"), ["'training.cpu_tuning'", "auto, off"], False,
    ),
    "bad_data_with_overwrite_keeps_prior_run": (
        lambda c: train(c, "data.columns.label=verdict", "--overwrite"), ["data.columns.label='verdict' not found"], True,
    ),
}  # fmt: skip


def expect_exit_2(argv: list[str], capsys: pytest.CaptureFixture, expected: list[str], status: int = 2) -> str:
    """`main(argv)` exits with `status` (2: bad input) and one error line holding every part of `expected`."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-finetune: error:")]
    assert code == status, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, ctx: Ctx, capsys: pytest.CaptureFixture) -> None:
    build, expected, prior = CASES[case]
    if prior:
        fake_prior_run(ctx.out)
    argv = build(ctx)
    target = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), ctx.out))
    before = snapshot(target)
    expect_exit_2(argv, capsys, expected)
    assert snapshot(target) == before, "output_dir was created or changed"


def test_disk_full_while_saving_keeps_previous_work(
    ctx: Ctx, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of writing a checkpoint, then of the final model: what was there stays whole."""
    assert main(train(ctx, "training.save_every=2")) == 0
    kept = {name: snapshot(ctx.out / name) for name in ("checkpoints", "model", "results.json")}

    from accelerate import Accelerator

    def full_disk_save_state(self, output_dir: str, **kwargs) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", full_disk_save_state)
        line = expect_exit_2(
            train(ctx, "training.resume=true", "training.max_steps=4", "training.save_every=2"),
            capsys,
            ["step_00000004", "no space left on device", "MB free"],
            status=1,
        )
    assert "intact" in line
    assert {name: snapshot(ctx.out / name) for name in kept} == kept
    assert not list((ctx.out / "checkpoints").glob(".*tmp"))

    from transformers import PreTrainedModel

    def full_disk_save_pretrained(self, folder, **kwargs) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", full_disk_save_pretrained)
        expect_exit_2(
            train(ctx, "training.resume=true", "training.max_steps=3"), capsys, ["model", "no space left"], status=1
        )
    assert snapshot(ctx.out / "model") == kept["model"]
    assert snapshot(ctx.out / "results.json") == kept["results.json"]
    assert not (ctx.out / ".model.tmp").exists()

    # a checkpoint counts batches of its own size: resuming with another global batch is refused
    expect_exit_2(
        train(ctx, "training.resume=true", "training.max_steps=3", "training.batch_size=8"),
        capsys,
        ["training.resume", "global batch 16", "this run has 8"],
    )
    assert snapshot(ctx.out / "checkpoints") == kept["checkpoints"]


def test_a_really_full_disk_keeps_the_last_checkpoint(
    ctx: Ctx, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """On a tmpfs too small for a third checkpoint: exit 1 naming the checkpoint and the free space, the partial
    folder gone, the previous checkpoints whole (a copy of the folder resumes from them elsewhere)."""
    import subprocess

    probe = subprocess.run(["du", "-sk", "--apparent-size", str(ctx.model)], capture_output=True, text=True)
    mount = tmp_path / "small"
    mount.mkdir()
    # room for the log, recipe and two checkpoints of the tiny model (weights + AdamW moments ~ 4x the weights)
    size_kb = 12 * int(probe.stdout.split()[0]) + 512
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        out = mount / "run"
        line = expect_exit_2(
            train(ctx, f"output_dir={out}", "training.save_every=2", "training.max_steps=40"),
            capsys, ["no space left on device", "MB free", str(out / "checkpoints")], status=1,
        )  # fmt: skip
        steps = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert steps and all(not name.startswith(".") for name in steps), steps  # the partial one removed
        assert f"step_{int(steps[-1][5:]) + 2:08d}" in line
        assert not (out / "results.json").exists()
        copy = tmp_path / "copy"
        shutil.copytree(out, copy)
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # lazy: a writer left open must not pin it
    assert main(train(ctx, f"output_dir={copy}", "training.save_every=2", "training.max_steps=40",
                      "training.resume=true")) == 0  # fmt: skip

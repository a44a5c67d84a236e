"""Raw splits from local files, `save_to_disk` folders or the Hub, checked before any model is loaded."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets import Dataset, DatasetDict

from hf_finetune.errors import InputError

if TYPE_CHECKING:
    from hf_finetune.recipe import DataConfig, SplitConfig

SPLITS = ("train", "validation", "test")
# datasets' packaged builders, keyed by the file suffixes they read
BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
# CoNLL-style column files (word ... tag per line, a blank line between sentences), read here: datasets has no builder
COLUMN_FILES = (".conll", ".iob", ".bio")


def data_roots() -> list[Path]:
    """Where relative data paths are looked up after the working directory: $HF_FINETUNE_DATA, then ../shared/data
    beside the repository (and beside the working directory, for installs that are not editable)."""
    roots = []
    if os.environ.get("HF_FINETUNE_DATA"):
        roots.append(Path(os.environ["HF_FINETUNE_DATA"]))
    repo = Path(__file__).resolve().parent.parent
    roots += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return roots


def resolve_path(path: str) -> Path | None:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate if candidate.exists() else None
    for root in data_roots():
        if (root / candidate).exists():
            return root / candidate
    return None


def say(message: str) -> None:
    """One line on stderr from the first process of a launch: where each split's data comes from."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"hf-finetune: {message}", file=sys.stderr, flush=True)


def load_split(split: SplitConfig, where: str) -> Dataset:
    """Load one split. `where` is its dotted recipe key, used in error messages."""
    local = resolve_path(split.path) if split.path else None
    if split.path and local is None and split.name is None:
        roots = ", ".join(str(r) for r in data_roots())
        raise InputError(
            f"{where}.path: {split.path} not found (looked in the working directory and {roots})"
        )
    if split.streaming:
        return _stream(split, local, where)
    if local is not None:
        say(f"{where}: {local}")
        dataset = _load_local(local, split.split, where)
    else:
        missing = f" ({split.path} not found locally)" if split.path else ""
        say(f"{where}: Hub dataset {split.name!r}" + (f" ({split.config})" if split.config else "") + missing)
        try:
            dataset = datasets.load_dataset(
                split.name, split.config, split=split.split or where.rsplit(".", 1)[-1]
            )
        except Exception as err:  # the Hub raises many types; all mean "this name cannot be had here"
            raise InputError(
                f"{where}: could not load Hub dataset {split.name!r}: {str(err).splitlines()[0]}"
            ) from err
    if split.skip:
        dataset = dataset.select(range(min(split.skip, len(dataset)), len(dataset)))
    if split.max_samples is not None:
        dataset = dataset.select(range(min(split.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise InputError(f"{where}: split is empty ({split.path or split.name})")
    return dataset


def _stream(split: SplitConfig, local: Path | None, where: str) -> datasets.IterableDataset:
    """The split as a `datasets.IterableDataset`: local csv/json/jsonl/parquet/txt files read lazily, or the Hub
    dataset streamed. Its first row is read here, so that a missing or empty source fails before anything else."""
    if local is not None:
        files = sorted(p for p in local.iterdir() if p.suffix in BUILDERS) if local.is_dir() else [local]
        if not files or len({f.suffix for f in files}) > 1:
            raise InputError(f"{where}.path: {local}: streaming reads one kind of {'/'.join(BUILDERS)} files")
        say(f"{where}: {local} (streamed)")
        kwargs = {"delimiter": "\t"} if files[0].suffix == ".tsv" else {}
        stream = datasets.load_dataset(
            BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
        )
    else:
        say(f"{where}: Hub dataset {split.name!r} (streamed)")
        try:
            stream = datasets.load_dataset(
                split.name, split.config, split=split.split or where.rsplit(".", 1)[-1], streaming=True
            )
        except Exception as err:  # the Hub raises many types; all mean "this name cannot be had here"
            raise InputError(f"{where}: could not stream Hub dataset {split.name!r}: {str(err).splitlines()[0]}") from err
    if split.skip:
        stream = stream.skip(split.skip)
    if split.max_samples is not None:
        stream = stream.take(split.max_samples)
    if next(iter(stream), None) is None:
        raise InputError(f"{where}: split is empty ({split.path or split.name})")
    return stream


def _load_local(path: Path, split_name: str | None, where: str) -> Dataset:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            key = split_name or where.rsplit(".", 1)[-1]
            if key not in loaded:
                raise InputError(f"{where}: {path} has splits {list(loaded)}, not {key!r}; set {where}.split")
            return loaded[key]
        return loaded
    readable = (*BUILDERS, *COLUMN_FILES)
    files = sorted(p for p in path.iterdir() if p.suffix in readable) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{where}.path: {path} holds no {'/'.join(readable)} files")
    suffixes = {f.suffix for f in files}
    if len(suffixes) > 1 or files[0].suffix not in readable:
        raise InputError(f"{where}.path: {path}: cannot read files of type {', '.join(sorted(suffixes))}")
    suffix = files[0].suffix
    if BUILDERS.get(suffix) != "parquet":
        for file in files:
            check_utf8(file)
    if suffix in COLUMN_FILES:
        rows = [row for f in files for row in conll_rows(f)]
        if not rows:
            raise InputError(f"{where}: split is empty ({path})")
        return Dataset.from_list(rows)
    if suffix == ".json":
        nested = [_squad_rows(f) for f in files]
        if all(rows is not None for rows in nested):
            return Dataset.from_list([row for rows in nested for row in rows])
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if all(f.stat().st_size == 0 for f in files):
        raise InputError(f"{where}: split is empty ({path})")
    logger = datasets.utils.logging.get_logger("datasets")
    level = logger.level
    # datasets logs its parse error with a traceback; the one line below says it, naming the file
    logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(
            BUILDERS[suffix], data_files=[str(f) for f in files], split="train", **kwargs
        )
    except Exception as err:  # pyarrow/json parse errors: report the file, not a traceback
        root = err
        while root.__cause__ is not None:  # datasets wraps the parser's error in a generic one
            root = root.__cause__
        message = str(root).splitlines()[0] if str(root) else type(root).__name__
        if "corresponds to no data" in message:
            raise InputError(f"{where}: split is empty ({path})") from err
        raise InputError(f"{path}: cannot be parsed as {BUILDERS[suffix]}: {message}") from err
    finally:
        logger.setLevel(level)


def check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8: pyarrow's JSON reader lets such bytes into string columns and fails much
    later, its CSV reader fails with a message that names neither file nor line."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path} line {number}: not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8"
                ) from err


def conll_rows(path: Path) -> list[dict]:
    """Sentences of a CoNLL-style column file as rows {tokens, tags}: the first column is the word, the last the tag
    (POS or chunk columns between them are ignored), a blank line ends a sentence, `-DOCSTART-` lines are skipped."""
    rows: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            cells = line.split()
            if cells and cells[0] == "-DOCSTART-":
                continue
            if not cells:
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if len(cells) < 2:
                raise InputError(f"{path} line {number}: expected a word and a tag separated by whitespace, got {line.strip()!r}")
            tokens.append(cells[0])
            tags.append(cells[-1])
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _squad_rows(path: Path) -> list[dict] | None:
    """The rows of an official SQuAD JSON file (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`),
    flattened to the Hub `squad` layout; None when `path` is not such a file. datasets' json builder would read the
    nesting as one row per article."""
    with path.open("rb") as f:
        if f.read(4096).lstrip()[:1] != b"{":
            return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSON lines, or broken: datasets' builder reports it
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list) or not all(isinstance(a, dict) and "paragraphs" in a for a in articles):
        return None
    rows = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append(
                    {
                        "id": str(qa["id"]),
                        "title": article.get("title", ""),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [int(a["answer_start"]) for a in answers],
                        },
                    }
                )
    return rows


def load_splits(config: DataConfig) -> DatasetDict:
    """Every split the recipe names, each checked for emptiness; column checks are the task's job."""
    splits = {}
    for name in SPLITS:
        split = getattr(config, name)
        if split is not None:
            splits[name] = load_split(split, f"data.{name}")
    return DatasetDict(splits)


def require_columns(dataset: Dataset, columns: dict[str, str | None], split: str) -> None:
    """Raise one error naming every recipe column key that does not exist in the split."""
    missing = [
        f"data.columns.{key}={col!r}"
        for key, col in columns.items()
        if col and col not in dataset.column_names
    ]
    if missing:
        raise InputError(
            f"data.{split}: column(s) {', '.join(missing)} not found; the split has {', '.join(dataset.column_names)}"
        )


def class_names(dataset: Dataset | datasets.IterableDataset, column: str) -> list[str] | None:
    """Names in id order of a column whose values are `ClassLabel` ids, or of a list column of them (a Hub dataset's
    labels and tags); None for a column of plain values."""
    feature = (dataset.features or {}).get(column)
    # a List/Sequence feature holds its item type in `.feature`; a plain-list feature spec, as its only item
    inner = getattr(feature, "feature", None) or (feature[0] if isinstance(feature, list) and feature else None)
    names = getattr(feature, "names", None) or getattr(inner, "names", None)
    return list(names) if names else None

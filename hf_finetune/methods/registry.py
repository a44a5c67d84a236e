"""Every method, by the name recipes use (`method.name`); keys equal the module names under `hf_finetune/methods/`.

Everything that lists methods derives from this dict: the recipe's allowed values, the CLI help, `merge`'s refusals,
`compare`'s defaults, and the README's methods table (checked by tests/test_methods.py).
"""

from __future__ import annotations

from hf_finetune.methods import adalora, dora, full, ia3, lokr, lora, prefix, prompt, qlora, vera
from hf_finetune.methods.base import Method

METHODS: dict[str, Method] = {
    "full": full.METHOD,
    "lora": lora.METHOD,
    "adalora": adalora.METHOD,
    "prefix": prefix.METHOD,
    "prompt": prompt.METHOD,
    "ia3": ia3.METHOD,
    "dora": dora.METHOD,
    "lokr": lokr.METHOD,
    "vera": vera.METHOD,
    "qlora": qlora.METHOD,
}
METHOD_NAMES = tuple(METHODS)
DEFAULT_METHOD = lora.METHOD.name
"""The method a recipe gets when it names none."""
COMPARED_BY_DEFAULT = tuple(name for name, m in METHODS.items() if m.in_default_comparison)


def get_method(name: str) -> Method:
    return METHODS[name]

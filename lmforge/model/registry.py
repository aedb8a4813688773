"""Model classes by name: which class is built from a ModelConfig (its `arch` field).

    MODELS = {"transformer": Transformer, ...}     name -> builder(cfg) -> nn.Module
    register_model("mamba", MambaLM)               a model family outside the Transformer adds itself
    build_model(cfg)                               MODELS[cfg.arch or "transformer"](cfg)

Every path that rebuilds a model from a config goes through `build_model`: the HF loader
(lmforge.model.hf.load_pretrained, from the ModelConfig a family's cfg_from_hf returns, `arch` set by the family),
`save_pretrained` (a model whose arch is not 'transformer' names its family= explicitly: guessing one from a
Transformer's fields would export the wrong layout), and lmforge checkpoints (lmforge.checkpoint.load_model:
config.json's "model" is the ModelConfig, `arch` included; a checkpoint written before the field reads None,
the Transformer, so it loads unchanged). The other places that build a Transformer from a config on purpose
(training from scratch, upcycling, the FLOP counter, a critic's trunk) still build one.

What a registered class owes (the model interface lmforge.infer and lmforge.train use):
  - `__init__` (or the builder) takes the ModelConfig and keeps it as `model.cfg` (lmforge.checkpoint.model_meta
    records a model's config only from there);
  - it builds on the meta device (load_pretrained allocates once with to_empty), ties shared parameters in
    `__init__` (the loader re-ties after allocating: any parameter reachable under two names stays shared);
  - `forward(ids, positions=None, cache=None, meta=None) -> logits` and `cache_spec()` for the engine: a
    recurrent layer describes its state there (docs/state_caches.md).
The fields a ModelConfig lacks for such a class (a Mamba's d_state, d_conv, expand) are the issue of the class
that needs them, as model.moe / model.mla were; entries of `layer_types` other than 'full' and 'sliding' (a
hybrid's recurrent layers) are left to the registered class to check.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from lmforge.config import claim
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

Builder = Callable[[ModelConfig], nn.Module]

MODELS: dict[str, Builder] = {"transformer": Transformer}
"""ModelConfig.arch -> what builds that model from its config (None: 'transformer')"""


def register_model(name: str, build: Builder) -> None:
    """Add a model class under `name` (ModelConfig.arch); a name taken by another builder is refused."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a model class registers under a non-empty name, got {name!r}")
    claim(MODELS, name, build, "model arch")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes, built by the class its arch names (on the current default device)."""
    arch = cfg.arch or "transformer"
    if arch not in MODELS:
        raise ConfigError(f"model.arch={arch!r} is not a registered model class (registered: {sorted(MODELS)}); "
                          "import the module that registers it (lmforge.model.registry.register_model) first")
    return MODELS[arch](cfg)

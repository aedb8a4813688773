"""The one training loop (trainer.py: Trainer(model, optimizer, data, objective, hooks); interrupts.py:
stopping it at a step boundary; resume.py: its checkpoints and resuming from them; rundir.py and
param_groups.py: the run_dir and optimizer checks beside it) and what runs on it: pretraining (config.py
TrainConfig, pretrain.py, data.py token windows, mixture.py mid-training mixtures, loss.py), post-training
runs (posttrain.py: `lmforge sft|dpo|rm|distill`), metrics. Checkpoint directories live in lmforge.checkpoint.

`lmforge.train` is both this package and the public function `lf.train(cfg)`: once a submodule is
imported, Python binds the package to the attribute `lmforge.train`, so the package itself is made
callable (it runs `lmforge.train.trainer.train`).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, cfg):
        """Train as `lmforge train` does; see lmforge.train.trainer.train."""
        from lmforge.train.trainer import train

        return train(cfg)


sys.modules[__name__].__class__ = _CallablePackage

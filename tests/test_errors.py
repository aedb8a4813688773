"""Missing optional packages and bad devices are one-line errors that name the fix; no loss.png is said."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.train.metrics import MetricsLog, peak_flops, plot_losses
from lmforge.utils import pick_device


def test_scaling_fit_without_scipy_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now fails, as when it is not installed
    assert main(["scaling", "fit", "--table", str(tmp_path / "runs.csv")]) == 2
    err = capsys.readouterr().err
    assert "needs the 'scipy' package: pip install 'lmforge[scaling]'" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, module, extra", [("tensorboard", "tensorboard", "tensorboard"),
                                                 ("wandb", "wandb", "wandb")])
def test_logging_backends_name_their_own_extra(tmp_path, monkeypatch, flag, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(Exception, match=rf"pip install 'lmforge\[{extra}\]'"):
        MetricsLog(tmp_path, **{flag: True})


def test_no_matplotlib_says_no_loss_png(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_losses(tmp_path) is None and not (tmp_path / "loss.png").exists()
    assert "no loss.png was written (pip install 'lmforge[plot]')" in capsys.readouterr().err


def test_no_mfu_on_cpu():
    """A CPU has no datasheet peak, and one measured at start-up gave MFUs above 100%: tokens/s only."""
    assert peak_flops("cpu") is None


@pytest.mark.parametrize("name, message", [("tpu", "device 'tpu' is not a device torch knows"),
                                           ("meta", "device 'meta' is not supported by lmforge"),
                                           ("cpu:5", "device 'cpu:5': the CPU is one device, 'cpu'")])
def test_unknown_devices(name, message):
    with pytest.raises(ConfigError, match=message):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"device 'cuda': CUDA is not available .* use --device cpu"):
        pick_device("cuda")
    assert main(["train", "--device", "cuda", "--run-dir", str(tmp_path / "r")]) == 2
    assert "device 'cuda': CUDA is not available" in capsys.readouterr().err

"""reference_device / teacher_device naming a device this machine lacks: a one-line error naming the option,
before any model is loaded (was torch's RuntimeError traceback for 'gpu', an AssertionError from load_model for a
CUDA device on a CPU machine, after the policy was loaded)."""

import pytest
import torch

from lmforge.align.config import config_class
from lmforge.align.frozen import Frozen
from lmforge.errors import ConfigError
from lmforge.train import posttrain as PT

BAD = ["gpu", "cuda:2"] if not torch.cuda.is_available() else ["gpu", f"cuda:{torch.cuda.device_count()}"]


@pytest.mark.parametrize("device", BAD)
@pytest.mark.parametrize("objective,role", [("dpo", "reference"), ("kto", "reference"), ("distill", "teacher")])
def test_a_frozen_models_device_is_checked_before_any_model_loads(tmp_path, objective, role, device):
    cls = config_class(objective)
    options = getattr(cls(), objective)
    cfg = cls(init=str(tmp_path / "no-such-model"), run_dir=str(tmp_path / "run"), teacher=str(tmp_path / "t"),
              **{objective: type(options)(**{f"{role}_device": device})})
    with pytest.raises(ConfigError, match=f"^{objective}.{role}_device: device '{device}'.*; or leave "
                                          f"{objective}.{role}_device unset") as e:
        PT.posttrain(cfg)  # (the init does not exist: the device is refused first)
    assert "\n" not in str(e.value) and "--device" not in str(e.value)  # (its own option's fix, not the run's)


def test_frozen_refuses_a_device_in_one_line_and_takes_auto():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="^reference_device: device 'gpu' is not a device torch knows"):
        Frozen(model, role="reference", device="gpu")
    with pytest.raises(ConfigError, match="^teacher_device: device 'cuda:9'"):
        Frozen(model, role="teacher", device="cuda:9")
    assert Frozen(model, role="reference", device="auto")._target.type == ("cuda" if torch.cuda.is_available()
                                                                            else "cpu")

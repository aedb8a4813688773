"""The constructors of Muon, Dion, Shampoo and SOAP refuse a hyper-parameter outside its range in one line naming it
(lmforge.optim.base.check_hyperparams), as OptimConfig and torch.optim do: before, a beta of 1, a zero eps or a NaN
learning rate was taken and only showed as a NaN or frozen loss steps later."""

import math
import re

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.optim.adafactor import Adafactor
from lmforge.optim.adamw import AdamW
from lmforge.optim.dion import Dion
from lmforge.optim.lion import Lion
from lmforge.optim.muon import Muon
from lmforge.optim.shampoo import Shampoo
from lmforge.optim.soap import SOAP

BAD = [  # (keyword, value, what the message says it must be)
    ("lr", -1e-3, ">= 0 and finite"),
    ("lr", math.nan, ">= 0 and finite"),
    ("betas", (0.9, 1.0), r"two values in \[0, 1\)"),
    ("betas", (-0.1, 0.95), r"two values in \[0, 1\)"),
    ("betas", 0.9, r"two values in \[0, 1\)"),
    ("eps", 0.0, "> 0"),
    ("eps", -1e-8, "> 0"),
    ("weight_decay", -0.1, ">= 0"),
]
EXTRA = {  # each optimizer's own hyper-parameters, checked the same way
    Muon: [("momentum", 1.0, r"in \[0, 1\)"), ("ns_steps", 0, ">= 1"), ("qk_clip_tau", -1.0, ">= 0")],
    Dion: [("momentum", -0.5, r"in \[0, 1\)"), ("rank", 0, ">= 1")],
    Shampoo: [("precond_beta", 0.0, r"in \(0, 1\]"), ("precond_eps", 0.0, "> 0"), ("block_size", 0, ">= 1"),
              ("precondition_frequency", 0, ">= 1"), ("graft", "sgd", "'adam'")],
    SOAP: [("precond_beta", 1.5, r"in \(0, 1\]"), ("precondition_frequency", 0, ">= 1"), ("block_size", -1, ">= 1")],
}
CASES = [(cls, *bad) for cls in EXTRA for bad in BAD + EXTRA[cls]]


@pytest.mark.parametrize("cls,name,value,want", CASES,
                         ids=[f"{c.__name__}-{n}={v}" for c, n, v, _ in CASES])
def test_a_hyperparameter_out_of_range_is_refused_naming_it(cls, name, value, want):
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ConfigError) as e:
        cls([p], **{name: value})
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{cls.__name__}: {name}={value!r} must be ")
    assert re.search(want, message)


@pytest.mark.parametrize("cls", list(EXTRA))
def test_the_edges_of_each_range_are_accepted_and_step(cls):
    """lr = 0, a beta of 0, no weight decay: valid (torch.optim takes them), and the step leaves the weights as they
    were at lr = 0."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    opt = cls([p], lr=0.0, betas=(0.0, 0.0), eps=1e-12, weight_decay=0.0)
    p.grad = torch.randn(4, 3)
    opt.step()
    assert torch.equal(p.detach(), before)


OTHERS = [  # AdamW, Lion and Adafactor share the check (their own hyper-parameter sets)
    (AdamW, "betas", (0.9, 1.0), r"two values in \[0, 1\)"), (AdamW, "eps", 0.0, "> 0"),
    (AdamW, "lr", math.nan, ">= 0 and finite"), (Lion, "betas", (1.0, 0.99), r"two values in \[0, 1\)"),
    (Lion, "weight_decay", -1.0, ">= 0"), (Adafactor, "beta1", 1.0, r"in \[0, 1\)"),
    (Adafactor, "decay_rate", 0.0, r"in \(0, 1\]"), (Adafactor, "eps1", 0.0, "> 0"),
    (Adafactor, "clip_threshold", 0.0, "> 0"), (Adafactor, "lr", -1.0, ">= 0"),
]


@pytest.mark.parametrize("cls,name,value,want", OTHERS, ids=[f"{c.__name__}-{n}={v}" for c, n, v, _ in OTHERS])
def test_adamw_lion_adafactor_refuse_the_same_way(cls, name, value, want):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: {name}={re.escape(repr(value))} must be {want}"):
        cls([torch.nn.Parameter(torch.randn(4, 3))], **{name: value})

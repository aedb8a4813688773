"""Checkpoint directories: any nn.Module, checksums, umask, disk full, partial folders, HF directories."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.errors import CheckpointError, ConfigError


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_any_module_round_trips(tmp_path):
    model = _toy()
    path = ckpt.save_checkpoint(tmp_path, 3, model, train_state={"step": 3})
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ckpt.load_weights(other, path)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert ckpt.load_train_state(path) == {"step": 3}
    with pytest.raises(CheckpointError, match="torch.nn.modules.container.Sequential model"):
        ckpt.load_model(tmp_path)


def test_a_train_state_a_resume_could_not_read_is_refused_before_writing(tmp_path):
    """Checkpoints are read back with torch.load(weights_only=True): a data source's or objective's state
    holding a numpy value would make every checkpoint unusable at the resume, so the save refuses it in one
    line naming where it is and the fix, and writes nothing; plain Python values and tensors save and load."""
    np = pytest.importorskip("numpy")
    cases = {"data": {"i": np.int64(3)}, "objective": {"kl": {"history": [1.0, np.arange(2)]}}}
    where = {"data": r"the data source's state_dict\(\)\['i'\] is a numpy.int64",
             "objective": r"the objective's state_dict\(\)\['kl'\]\['history'\]\[1\] is a numpy.ndarray"}
    for key, state in cases.items():
        with pytest.raises(ConfigError, match=where[key] + r", which a checkpoint cannot hold .* int\(x\)"):
            ckpt.save_checkpoint(tmp_path, 1, _toy(), train_state={"step": 1, key: state, "m": torch.ones(2)})
        assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    fine = {"step": 1, "data": {"i": 3, "perm": torch.arange(3), "rng": (3, (1, 2), None)}, "objective": {}}
    path = ckpt.save_checkpoint(tmp_path, 1, _toy(), train_state=fine)
    got = ckpt.load_train_state(path)
    assert got["data"]["rng"] == (3, (1, 2), None) and torch.equal(got["data"]["perm"], torch.arange(3))


def test_same_size_corruption_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _toy())
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the last tensor: size unchanged
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted .SHA-256"):
        ckpt._verify(path)


def test_a_missing_and_a_cut_weight_file_are_told_apart(tmp_path):
    """A deleted model.safetensors was reported as 'truncated or damaged (missing bytes, ...)'."""
    path = ckpt.save_checkpoint(tmp_path, 1, _toy())
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=rf"model.safetensors is truncated or damaged \({len(data) - 3} bytes"):
        ckpt._verify(path)
    w.unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing \(manifest.json lists it"):
        ckpt._verify(path)


def test_files_honour_the_umask(tmp_path):
    from lmforge.tokenizer.byte import ByteTokenizer

    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, _toy(), train_state={}, tokenizer=ByteTokenizer())
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _toy()
    good = ckpt.save_checkpoint(tmp_path, 1, model, train_state={"a": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk full at .*\.step_000002\.writing-\d+-[0-9a-f]{8} while "
                                                  r"writing the step 2"):
        ckpt.save_checkpoint(tmp_path, 2, model, train_state={"a": 2})
    assert ckpt.checkpoint_dirs(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]
    ckpt._verify(good)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_really_full_disk_under_the_train_state_is_named(tmp_path, monkeypatch):
    """torch.save given a path writes through its C++ stream, which reports a full disk as a bare RuntimeError
    ('unexpected pos 704 vs 598'): a run on a full disk ended in that traceback instead of the disk-full line.
    Here train_state.pt is /dev/full (found 2026-12-06 on a 400 KB tmpfs)."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def then_full(weights, filename, **kw):  # the weights fit; the train state meets a full disk
        real(weights, filename, **kw)
        (Path(filename).parent / "train_state.pt").symlink_to("/dev/full")

    model = _toy()
    good = ckpt.save_checkpoint(tmp_path, 1, model, train_state={"a": 1})
    monkeypatch.setattr(safetensors.torch, "save_file", then_full)
    with pytest.raises(CheckpointError, match=r"disk full at .*\.step_000002\.writing-\d+-[0-9a-f]{8} while "
                                                  r"writing the step 2"):
        ckpt.save_checkpoint(tmp_path, 2, model, train_state={"a": torch.zeros(10_000)})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_a_rewritten_step_keeps_its_old_checkpoint_when_the_rewrite_fails(tmp_path, monkeypatch):
    """Writing a step that exists again (a resumed run's) replaces it whole or not at all: a failure at the
    rename that puts the new one in place leaves the old one, verified, where it was (it used to be deleted
    first, so the step was lost; found 2026-12-05)."""
    old = _toy()
    good = ckpt.save_checkpoint(tmp_path, 5, old, train_state={"a": 1})
    rename = os.replace

    def failing(src, dst):  # the rename of the new checkpoint (hidden while written) onto step_000005
        if Path(dst) == good and Path(src).name.startswith(".") and ".replaced-" not in Path(src).name:
            raise OSError("simulated failure at the rename")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with torch.no_grad():
        new = _toy().requires_grad_(False)
        new[0].weight.add_(1.0)
    with pytest.raises(OSError, match="simulated failure"):
        ckpt.save_checkpoint(tmp_path, 5, new, train_state={"a": 2})
    monkeypatch.setattr(os, "replace", rename)
    assert ckpt.checkpoint_dirs(tmp_path) == [good] and [p.name for p in good.parent.iterdir()] == [good.name]
    ckpt._verify(good)
    loaded = _toy()
    ckpt.load_weights(loaded, good)
    assert torch.equal(loaded[0].weight, old[0].weight) and ckpt.load_train_state(good) == {"a": 1}
    ckpt.save_checkpoint(tmp_path, 5, new, train_state={"a": 2})  # and a rewrite that succeeds replaces it
    ckpt.load_weights(loaded, good)
    assert torch.equal(loaded[0].weight, new[0].weight) and ckpt.load_train_state(good) == {"a": 2}
    assert [p.name for p in good.parent.iterdir()] == [good.name]


def test_partial_folders_of_dead_writers_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    dead = root / ".tmp_step_000005_999999999"  # no such pid
    alive = root / f".tmp_step_000006_{os.getppid()}"  # a live process (our parent)
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 10)
    assert ckpt.clean_partial(tmp_path) == [dead]
    assert not dead.exists() and alive.exists()


def test_a_writer_killed_while_rewriting_a_step_leaves_it_restorable(tmp_path):
    """What a writer killed inside atomic_dir leaves: the new checkpoint half written (removed), or, killed
    between its two renames, the step's old checkpoint moved aside with no step_* in its place (put back at
    resume), or moved aside after the new one was renamed in (removed)."""
    m = _toy()
    root = tmp_path / "checkpoints"
    five, six = ckpt.save_checkpoint(tmp_path, 5, m), ckpt.save_checkpoint(tmp_path, 6, m)
    aside = root / ".step_000005.replaced-999999999"  # a dead pid
    os.replace(five, aside)
    stale = root / ".step_000006.replaced-999999999"
    ckpt.save_checkpoint(tmp_path, 6, m).rename(stale)
    ckpt.save_checkpoint(tmp_path, 6, m)
    partial = root / ".step_000007.writing-999999999"
    partial.mkdir()
    live = root / f".step_000008.writing-{os.getppid()}"
    live.mkdir()
    assert ckpt.checkpoint_dirs(tmp_path) == [six]
    assert ckpt.clean_partial(tmp_path) == [stale, partial]
    assert ckpt.checkpoint_dirs(tmp_path) == [five, six] and not aside.exists() and live.exists()
    ckpt._verify(five)


def test_a_writer_is_known_by_its_pid_and_start_not_the_pid_alone(tmp_path):
    """Leftovers named with a PID that a live process now has, but whose tag (host, boot, start time) is not
    that process's, are a killed writer's: the only checkpoint moved aside is put back and the partial one
    removed (trusting the PID left both forever, and the resume started from nothing). A name with the live
    process's own tag is left alone."""
    from lmforge.utils import process_tag

    root = tmp_path / "checkpoints"
    live_pid, live_tag = os.getppid(), process_tag(os.getppid())
    assert live_tag is not None and process_tag(999_999_999) is None
    other = "0" * 8 if live_tag != "0" * 8 else "1" * 8  # the tag of an earlier process with the same PID
    five = ckpt.save_checkpoint(tmp_path, 5, _toy())
    os.replace(five, root / f".step_000005.replaced-{live_pid}-{other}")
    partial = root / f".step_000006.writing-{live_pid}-{other}"
    live = root / f".step_000007.writing-{live_pid}-{live_tag}"
    for d in (partial, live):
        d.mkdir()
    assert ckpt.clean_partial(tmp_path) == [partial]
    assert ckpt.checkpoint_dirs(tmp_path) == [five] and live.exists()
    ckpt._verify(five)


def _tiny_hf_dir(path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer.train import train_bpe

    ours = train_bpe(iter(["the cat sat on the mat, the dog ran past the red house. " * 20]), 300,
                     special_tokens=["<|endoftext|>"], progress=False, workers=1)
    path.mkdir()
    ours.save_hf(path / "tokenizer.json")
    hf_tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=hf_tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return hf, hf_tok


def test_hf_model_directory_loads_with_its_tokenizer(tmp_path):
    hf, hf_tok = _tiny_hf_dir(tmp_path / "hf")
    model, tok = ckpt.load_model(tmp_path / "hf")
    text = "the red cat ran"
    assert tok.encode(text) == hf_tok.encode(text).ids
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    out = LLM.load(tmp_path / "hf").generate([text], SamplingParams(temperature=0.0, max_tokens=5))[0]
    ref = hf.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.token_ids == ref


def test_a_reward_models_checkpoint_loads_back_with_its_head(tmp_path):
    """A SequenceHead (reward model, classifier) records its head beside the backbone's config, so a trained
    reward model loads from its path (an RL scorer) as the same model; an unknown head kind is named."""
    import json

    from lmforge.align.reward import SequenceHead
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    rm = SequenceHead(Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)),
                      out_dim=3, train_backbone=False)
    path = ckpt.save_checkpoint(tmp_path, 1, rm)
    back, _ = ckpt.load_model(path)
    ids = torch.randint(0, 64, (2, 7))
    assert isinstance(back, SequenceHead) and not back.train_backbone
    from lmforge.errors import ConfigError
    from lmforge.infer.llm import LLM
    from lmforge.tokenizer.byte import ByteTokenizer

    with pytest.raises(ConfigError, match="is a reward model, classifier or critic .* it does not generate"):
        LLM(back, ByteTokenizer())
    with torch.no_grad():
        assert torch.equal(back(ids), rm.eval()(ids))
    assert json.loads((path / "config.json").read_text())["head"] == {"kind": "sequence", "out_dim": 3,
                                                                    "train_backbone": False}
    rm.head_record = lambda: {"kind": "token_classes"}  # written by a later lmforge, say
    with pytest.raises(CheckpointError, match="head \\{'kind': 'token_classes'\\} is not one this lmforge builds"):
        ckpt.load_model(ckpt.save_checkpoint(tmp_path, 2, rm))


def test_a_hf_directory_is_hashed_once_until_its_files_change(tmp_path, monkeypatch):
    """checkpoint_identity of a HF directory (an adapter-only checkpoint's base, a reference model) reads
    its weight files once: the digest is remembered under path, size, mtime and inode; a rewritten file is
    read again. The identity is the same either way."""
    _tiny_hf_dir(tmp_path / "hf")
    monkeypatch.setenv(ckpt.HASH_CACHE_ENV, str(tmp_path / "cache"))
    from lmforge import utils  # (where remembered_sha256 reads sha256_file)

    reads, plain = [], ckpt.sha256_file
    monkeypatch.setattr(utils, "sha256_file", lambda p: reads.append(p.name) or plain(p))
    with pytest.raises(ConfigError, match="is not an adapter-only lmforge checkpoint .*nothing to rebase"):
        ckpt.rebase(tmp_path / "hf", tmp_path / "hf")  # (a HF directory has no base to move)
    first = ckpt.checkpoint_identity(tmp_path / "hf")
    assert reads == ["model.safetensors"] and len(list((tmp_path / "cache").iterdir())) == 1
    assert ckpt.checkpoint_identity(tmp_path / "hf") == first and len(reads) == 1  # remembered
    weights = tmp_path / "hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # (a new modification time, whatever the clock's resolution)
    changed = ckpt.checkpoint_identity(tmp_path / "hf")
    assert len(reads) == 2 and changed["sha256"] != first["sha256"]
    monkeypatch.setenv(ckpt.HASH_CACHE_ENV, "/proc/read-only-cache")  # nowhere to remember: still right
    assert ckpt.checkpoint_identity(tmp_path / "hf") == changed and len(reads) == 3


class _Codes(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("codes", torch.arange(-3, 3).to(dtype).view(2, 3))
        self.register_buffer("scales", torch.ones(2))


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.int8), (torch.int8, torch.float32),
                                           (torch.bool, torch.int8), (torch.float32, torch.bool)])
def test_integer_float_and_bool_tensors_do_not_load_into_each_other(tmp_path, saved, loaded):
    """load_weights checked shapes only: float "codes" loaded into an int8 buffer (truncated) and int8 codes
    into a float buffer without a word. Now refused in one line naming the tensor, both dtypes and the fix;
    a float tensor still loads into another float dtype (bf16 scales into an fp32 model)."""
    path = ckpt.save_checkpoint(tmp_path, 0, _Codes(saved).to(torch.bfloat16) if saved.is_floating_point
                                else _Codes(saved))
    model = _Codes(loaded)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(model, path)
    msg = str(e.value)
    assert "tensor codes is" in msg and str(loaded) in msg and "the same quantized layer kind" in msg
    assert "\n" not in msg
    assert torch.equal(model.codes, _Codes(loaded).codes)  # nothing loaded
    fine = _Codes(torch.int8)
    ckpt.load_weights(fine, ckpt.save_checkpoint(tmp_path / "ok", 0, _Codes(torch.int8).to(torch.bfloat16)))
    assert fine.scales.dtype == torch.float32 and fine.codes.dtype == torch.int8


class _Wrapped(torch.Tensor):
    """A minimal tensor subclass, as torchao's quantized weights are."""


def test_a_tensor_subclass_is_refused_before_anything_is_written(tmp_path):
    """A tensor subclass (torchao's Int8Tensor weights) killed the save deep inside safetensors ("Attempted to
    access the data pointer on an invalid python storage"); now it is refused in one line naming the tensor and
    the fix, and no checkpoint is left."""
    model = _toy()
    model[0].weight = torch.nn.Parameter(model[0].weight.detach().as_subclass(_Wrapped), requires_grad=False)
    with pytest.raises(ConfigError) as e:
        ckpt.save_checkpoint(tmp_path, 1, model)
    msg = str(e.value)
    assert msg.startswith("0.weight is a tests.train.test_checkpoint._Wrapped, a tensor subclass")
    assert "register_base_layer" in msg and "\n" not in msg
    assert ckpt.checkpoint_dirs(tmp_path) == []


def test_a_checkpoint_from_before_moe_experts_loads(tmp_path):
    """MoE's routed experts moved into MoE.experts (mlp.w_up -> mlp.experts.w_up): a checkpoint written with the
    old names loads, bit-exact, through load_weights (which compares names before load_state_dict) and load_model."""
    from safetensors.torch import load_file, save_file

    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mlp="moe",
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = ckpt.save_checkpoint(tmp_path, 1, model)
    state = load_file(str(path / "model.safetensors"))
    old = {n.replace(".experts.", "."): t for n, t in state.items()}
    assert old.keys() != state.keys() and "blocks.0.mlp.w_up" in old
    save_file(old, str(path / "model.safetensors"), metadata={"format": "pt"})
    ckpt._seal(path)  # (the manifest's checksums of the rewritten file)
    ids = torch.randint(0, 64, (1, 8))
    fresh = Transformer(cfg).eval()
    ckpt.load_weights(fresh, path)
    assert torch.equal(fresh(ids), model(ids))
    assert torch.equal(ckpt.load_model(path, tokenizer=False)[0](ids), model(ids))


def test_a_sharded_runs_checkpoint_keeps_the_models_eos_and_bos_ids(tmp_path):
    """A HF model's end-of-sequence ids and BOS (Transformer.eos_token_ids, bos_token_id) go into its checkpoint;
    the stand-in an FSDP run saves through (distributed.Gathered) carried neither, so a fine-tuned Llama saved by
    a sharded run stopped only at the tokenizer's end of text and exported bos_token_id null."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.distributed import Gathered

    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16))
    model.eos_token_ids, model.bos_token_id = (5, 6), 7  # as from_pretrained reads a HF checkpoint's
    for name, saved in (("single", model), ("sharded", Gathered(model, dict(model.state_dict())))):
        loaded, _ = ckpt.load_model(ckpt.save_checkpoint(tmp_path / name, 1, saved), tokenizer=False)
        assert (loaded.eos_token_ids, loaded.bos_token_id) == ((5, 6), 7), name


@pytest.mark.parametrize("text", ['{"peft_type": "LORA", ', ""])
def test_a_peft_directory_with_a_malformed_adapter_config_is_refused_at_its_identity(tmp_path, text):
    """checkpoint_identity of a PEFT directory whose adapter_config.json is not JSON took the unreadable file for
    a base it could not reach (a hub name) and gave the adapters' checksum alone, as though they had no base; a
    reference or teacher recorded by it failed only later, at load. Refused at once, naming the file."""
    from safetensors.torch import save_file

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(text)
    save_file({"lora_A": torch.zeros(2, 4)}, str(peft / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=f"^cannot read {peft / 'adapter_config.json'}: .*; the adapter's "
                                              "identity covers the base it names there: repair the file") as e:
        ckpt.checkpoint_identity(peft)
    assert "\n" not in str(e.value)
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_alpha": 8, "r": 2, '
                                              '"base_model_name_or_path": "org/a-hub-model"}')
    assert ckpt.checkpoint_identity(peft)["path"] == str(peft.resolve())  # a hub base: the adapters' identity

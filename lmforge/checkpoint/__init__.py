"""Checkpoints: directories written atomically, verified at load, refused rather than half-loaded.

    RUN_DIR/checkpoints/step_000500/
        config.json          model config (or the model's class) + lmforge version + git hash + step
        model.safetensors    weights (tied tensors stored once)
        train_state.pt       optimizer, data-source, objective and RNG state (loaded with weights_only=True)
        lmforge_tokenizer.json
        manifest.json        byte size and SHA-256 of every file above, written last

A checkpoint is built in a hidden `.step_*.writing-PID-TAG` directory and renamed into place
(lmforge.utils.atomic_dir; a step written again replaces its old checkpoint whole or not at all), so a crash
never leaves a partial `step_*`; a kill can leave the hidden directories, which `clean_partial` sorts out at
resume (TAG tells the writer apart from a later process with its PID).
On load every file's size and checksum is checked against the manifest (streamed, ~1.5 GB/s), so a
truncated or same-size-corrupted file is refused instead of producing NaNs later. Files get the mode
the umask allows (0644 under umask 022), so a shared run folder is readable by collaborators.

`load_model` also opens a HF-format model directory (config.json + safetensors of a supported family,
with its tokenizer.json), so every `--checkpoint` option and `LLM.load` accept downloaded models.

Adapter-only checkpoints (`save_checkpoint(..., base=base_record(init))`, what a LoRA run writes by default)
leave out exactly what the base gives back (`frozen_names`: the base model's frozen parameters and buffers,
a quantized base's codes too): model.safetensors holds everything else (what trains, a head, a frozen part
that is not the base's, such as a separate critic's trunk), and config.json's "base" names where the rest
comes from, {"path", "sha256", "merge_lora"}: the base checkpoint's resolved directory, its
checkpoint_identity checksum and whether its own adapters are merged first (a LoRA run whose init was
itself a LoRA checkpoint trains on the merged model). `load_model` rebuilds base + recorded adapters + saved
tensors, refusing a base that is missing or whose weights changed.

config.json records how to rebuild what is not a plain Transformer: "lora" ({layer: [r, scale]}, [r, scale,
"dora"] for DoRA: lmforge.adapt.lora.lora_record) and "base_layers" (the modules that are not what build_model
puts there - quantized Linears, experts, embeddings of a QLoRA model - by registered kind and settings:
lmforge.adapt.qlora; load_model builds them as empty shells on a Transformer made on the meta device, never their
float weights). A module quantized after its base checkpoint was loaded is not what that base gives back, so an
adapter-only checkpoint keeps its codes (_left_to_base), and refuses to leave to the base a frozen tensor the
base's model does not have. "dtype" is the model's float compute dtype (lmforge.utils.compute_dtype), which
load_model builds in (a checkpoint written before it was recorded loads in fp32); integer and boolean tensors
load only into their own dtype (castable). "eos_token_ids" and "bos_token_id" are the ids a HF model stops at
and a prompt begins with (bos_record: the saved tokenizer's BOS, else the model's), which save_pretrained writes
(a checkpoint written before bos_token_id was recorded takes its tokenizer's when that is loaded).

The package: store.py (step directories, leftovers of killed writers, the manifest, resolving a path),
identity.py (a checkpoint's weights checksum, the base an adapter-only one records, rebase), save.py
(save_checkpoint and what config.json records), load.py (load_model, load_weights, load_train_state),
templates.py (the chat template a checkpoint carries). Every name is imported from lmforge.checkpoint as before;
a test replacing a function replaces it in the module that calls it (lmforge.checkpoint.save._write), not here.
"""

# (_seal, _verify, _state_for_save: private names the trainer and tests use, re-exported as they were)
from lmforge.checkpoint.identity import BASE_HINT, base_record, checkpoint_identity, rebase, recorded_base
from lmforge.checkpoint.load import CAST_RULE, castable, check_same_model, load_model, load_recorded_base
from lmforge.checkpoint.load import load_train_state, load_weights, model_config_of, recorded_dtype
from lmforge.checkpoint.save import LEAVES_OUT, _state_for_save, bos_record, check_train_state, frozen_names
from lmforge.checkpoint.save import model_meta, save_checkpoint
from lmforge.checkpoint.store import EARLIER, _seal, _verify, checkpoint_dirs, clean_partial, is_hf_dir
from lmforge.checkpoint.store import resolve_checkpoint
from lmforge.checkpoint.templates import hf_chat_template, recorded_chat_template, template_dir
from lmforge.utils import HASH_CACHE_ENV, sha256_file  # (the digest remembered on disk is utils.remembered_sha256)

__all__ = ["BASE_HINT", "CAST_RULE", "EARLIER", "HASH_CACHE_ENV", "LEAVES_OUT", "base_record", "bos_record", "castable",
           "check_same_model", "check_train_state", "checkpoint_dirs", "checkpoint_identity", "clean_partial",
           "frozen_names", "hf_chat_template", "is_hf_dir", "load_model", "load_recorded_base", "load_train_state",
           "load_weights", "model_config_of", "model_meta", "rebase", "recorded_base", "recorded_chat_template",
           "recorded_dtype", "resolve_checkpoint", "save_checkpoint", "sha256_file", "template_dir",
           "_seal", "_state_for_save", "_verify"]

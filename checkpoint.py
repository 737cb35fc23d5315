"""
Checkpoint formats, in one place: the hub's config.json and safetensors (load and save, both key
layouts), the LIVR checkpoint (what training changed, on top of a base), the trainer's state for
--resume, and the one atomic directory swap every writer uses.

    m = checkpoint.load_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")    # strict: every tensor named
    m, meta = checkpoint.load_livr("runs/demo/stage2/final")         # base + LoRA + latent rows
    checkpoint.save_pretrained(model.merge_lora(m), "out/")          # the hub's layout

Everything is safetensors and JSON: nothing here ever unpickles. Every reader names the file and
the tensor or key that is missing, unknown, mis-shaped or non-finite (CheckpointError); every
writer writes beside the target and swaps the finished directory in (swap_in), so a kill at any
moment leaves a complete checkpoint under OUT, OUT.tmp or OUT.old.
"""
import ctypes
import json
import os
import shutil
from dataclasses import asdict

import torch

import checks
import masks
import model
from model import Config, Qwen25VL, TextConfig
from vision import VisionConfig


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}   # by flag value


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# config.json: the hub's flat form and transformers 5's nested one

def config_from_dict(d):
    """Both forms that exist: the hub's flat one (text fields at the top, `rope_scaling`) and
    transformers 5's nested one (`text_config`, `rope_parameters`). A "qwen3_vl" model_type
    (Qwen3-VL 2B/4B/8B, always nested) turns on the Qwen3-VL switches."""
    model_type = d.get("model_type", "qwen2_5_vl")
    if str(model_type).startswith("qwen3_vl") and model_type != "qwen3_vl":
        raise ValueError(f"model_type {model_type!r} is not supported (dense Qwen3-VL is \"qwen3_vl\")")
    if model_type not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"model_type {model_type!r} is not supported: this project implements "
                         "\"qwen2_5_vl\" (Qwen2.5-VL) and \"qwen3_vl\" (Qwen3-VL)")
    if model_type == "qwen3_vl":
        return _qwen3_config_from_dict(d)
    t = {**d, **d.get("text_config", {})}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    text = TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    eos = t.get("eos_token_id", 151645)
    ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                             "vision_end_token_id") if k in d}
    return Config(text=text, vision=VisionConfig.from_dict(d["vision_config"]),
                  eos_token_id=eos[0] if isinstance(eos, list) else eos, **ids)


def _qwen3_config_from_dict(d):
    """Qwen3-VL's config.json: text fields under `text_config` (the hub's `rope_scaling` +
    `rope_theta`, or transformers 5's `rope_parameters`), defaults as transformers' Qwen3VL*Config."""
    t = d.get("text_config") or {}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    heads = t.get("num_attention_heads", 32)
    bias = bool(t.get("attention_bias", False))
    text = TextConfig(
        vocab_size=t.get("vocab_size", 151936), hidden_size=t.get("hidden_size", 4096),
        intermediate_size=t.get("intermediate_size", 22016),
        num_hidden_layers=t.get("num_hidden_layers", 32), num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads") or heads,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 500000.0)),
        mrope_section=list(rope.get("mrope_section", [24, 20, 20])),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
        attention_bias=bias, o_proj_bias=bias, qk_norm=True, mrope_interleaved=True,
        explicit_head_dim=t.get("head_dim", 128))
    if t.get("hidden_act", "silu") != "silu":
        raise ValueError(f"text hidden_act {t['hidden_act']!r}: only silu is implemented")
    eos = t.get("eos_token_id", d.get("eos_token_id", 151645))
    ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                             "vision_end_token_id") if k in d}
    return Config(text=text, vision=VisionConfig.from_dict(d.get("vision_config") or {}, "qwen3_vl"),
                  eos_token_id=eos[0] if isinstance(eos, list) else eos, model_type="qwen3_vl", **ids)


def config_to_dict(cfg):
    """The hub's flat form, as Qwen/Qwen2.5-VL-3B-Instruct's config.json has it (Qwen3-VL:
    the nested form transformers 5 writes)."""
    if cfg.qwen3:
        return _qwen3_config_dict(cfg)
    t = asdict(cfg.text)
    for k in ("attention_bias", "o_proj_bias", "qk_norm", "mrope_interleaved", "explicit_head_dim"):
        t.pop(k)
    t["rope_scaling"] = {"type": "mrope", "mrope_section": t.pop("mrope_section")}
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            **t, "hidden_act": "silu", "vision_config": asdict(cfg.vision),
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "eos_token_id": cfg.eos_token_id,
            "torch_dtype": "bfloat16"}


def _qwen3_config_dict(cfg):
    t, v = cfg.text, asdict(cfg.vision)
    text = {"model_type": "qwen3_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": t.attention_bias, "tie_word_embeddings": t.tie_word_embeddings,
            "eos_token_id": cfg.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section), "mrope_interleaved": True}}
    vision = {k: v[k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size",
                                "out_hidden_size", "in_channels", "patch_size", "temporal_patch_size",
                                "spatial_merge_size", "hidden_act", "num_position_embeddings")}
    vision.update(model_type="qwen3_vl_vision", deepstack_visual_indexes=list(v["deepstack_visual_indexes"]),
                  rope_parameters={"rope_type": "axial", "rope_theta": v["rope_theta"]})
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": t.tie_word_embeddings,
            "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "eos_token_id": cfg.eos_token_id,
            "torch_dtype": "bfloat16"}


def read_json(file, what="file"):
    """A JSON object from `file`, or a CheckpointError that names the file and the position."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:     # also a 5000-digit number
        raise CheckpointError(f"{file}: not a valid JSON {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config(path):
    """Config from path/config.json; a missing or malformed key is named with the file."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no config.json: not a Qwen2.5-VL/Qwen3-VL checkpoint directory")
    d = read_json(file, "config")
    try:
        cfg = config_from_dict(d)
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AssertionError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{file}: malformed config ({type(e).__name__}: {e})") from None
    problems = checks.config_problems(cfg)      # before a model of that shape is ever built
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    return cfg


# ----------------------------------------------------------------------------------------------
# The hub's safetensors: key maps, strict loading, saving

BASE_MODULES = ("visual", "model", "lm_head")


def hub_key_map(m: Qwen25VL, layout="hub"):
    """{checkpoint key: our key} for every base weight. Our names are the hub's (legacy) keys;
    newer transformers write `model.visual.*` and `model.language_model.*` instead."""
    ours = [k for k in m.state_dict() if "lora_" not in k and k.split(".")[0] in BASE_MODULES]
    if m.cfg.text.tie_word_embeddings:
        ours.remove("lm_head.weight")       # tied: the hub file has no lm_head.weight
    if layout == "hub":
        return {k: k for k in ours}

    def new(k):
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model."):
            return "model.language_model." + k[len("model."):]
        return k
    return {new(k): k for k in ours}


def checkpoint_files(path):
    """The safetensors files of a hub checkpoint directory: its index's shards, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no \"weight_map\" of tensor -> shard file")
        return [os.path.join(path, str(s)) for s in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def resolve(path_or_repo_id):
    """A local checkpoint directory as is, or a hub id fetched (weights, configs, tokenizer)."""
    p = str(path_or_repo_id)
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        raise FileNotFoundError(f"{p} is a file, not a checkpoint directory")
    # a hub id is exactly "org/name"; anything that reads as a path is a missing directory
    if p.count("/") != 1 or p.startswith((".", "~", os.sep)) or os.path.isdir(os.path.dirname(p)):
        raise FileNotFoundError(f"{p}: no such directory (not a checkpoint directory or a hub id)")
    from huggingface_hub import snapshot_download
    return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt"])


def _safetensors_error(file, e):
    return CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt "
                           f"({type(e).__name__}: {e})")


def read_safetensors(file, device="cpu"):
    """{name: tensor} from a safetensors file; a truncated or corrupt file is named."""
    from safetensors.torch import load_file
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return load_file(file, device=str(device))
    except Exception as e:                # safetensors' own error type
        raise _safetensors_error(file, e) from None


def base_parameter_names(m: Qwen25VL):
    """Our names of the parameters the base (hub) checkpoint holds; the rest (latent rows, LoRA
    factors, a fork's modules) are new."""
    return set(hub_key_map(m).values()) | ({"lm_head.weight"} if m.cfg.text.tie_word_embeddings else set())


def load_pretrained(path_or_repo_id, dtype=torch.float32, device="cpu", num_latents=0,
                    latent_token_id=None, extend=None, shared_latent=False):
    """Build on `meta`, then fill every tensor from the safetensors files with assign=True.
    dtype=None keeps the checkpoint's dtype (bf16 on the hub). Strict: a missing, unexpected
    or wrongly shaped tensor raises an error that names it and its file. Then the latent rows,
    then each function of `extend` (default: EXTEND) adds a fork's modules."""
    from safetensors import safe_open
    path = resolve(path_or_repo_id)
    cfg = read_config(path)
    with torch.device("meta"):
        m = Qwen25VL(cfg)
    files = checkpoint_files(path)
    where = {}                                          # checkpoint key -> file (headers only)
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: missing shard (named in {path}'s index)")
        try:
            with safe_open(file, "pt") as f:
                where.update({k: file for k in f.keys()})
        except Exception as e:             # safetensors' own error type for a bad header
            raise _safetensors_error(file, e) from None
    new_layout = any(k.startswith(("model.visual.", "model.language_model.")) for k in where)
    key_map = hub_key_map(m, "new" if new_layout else "hub")
    expected = dict(m.state_dict())
    state, errors = {}, []
    errors += [f"unexpected tensor {k!r} in {file}" for k, file in where.items() if k not in key_map]
    errors += [f"missing tensor {k!r} (looked in {', '.join(files)})" for k in key_map if k not in where]
    for file in files:
        with safe_open(file, "pt", device=str(device)) as f:
            for key in f.keys():
                if key not in key_map:
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:     # the header promises more bytes than the file has
                    raise _safetensors_error(file, e) from None
                want = tuple(expected[key_map[key]].shape)
                if tuple(t.shape) != want:
                    errors.append(f"tensor {key!r} in {file} has shape {tuple(t.shape)}, "
                                  f"the config says {want}")
                    continue
                if not t.is_floating_point():
                    errors.append(f"tensor {key!r} in {file} is {t.dtype}, not floating point "
                                  "(a quantized checkpoint? this project loads bf16/fp16/fp32 weights)")
                    continue
                if not bool(torch.isfinite(t).all()):
                    errors.append(f"tensor {key!r} in {file} holds non-finite values")
                state[key_map[key]] = t if dtype is None else t.to(dtype)
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise CheckpointError(f"cannot load {path}:\n  " + "\n  ".join(errors[:20]) + more)
    m.load_state_dict(state, strict=False, assign=True)
    if cfg.text.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m = m.to(device)
    m.set_latents(num_latents, latent_token_id, shared_latent)
    for add in (model.EXTEND if extend is None else extend):
        add(m)
    return m.eval()


def save_pretrained(m: Qwen25VL, out_dir, max_shard_bytes=None):
    """Write config.json + safetensors in the hub's layout (LoRA merged first, latents left out:
    train.py saves those with its own checkpoints)."""
    from safetensors.torch import save_file
    if any(isinstance(mod, model.LoRALinear) for mod in m.modules()):
        raise ValueError("merge_lora(model) before save_pretrained: the hub layout has no LoRA")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_dict(m.cfg), f, indent=2)
    ours = m.state_dict()
    layout = "new" if m.cfg.qwen3 else "hub"     # Qwen3-VL's hub files use transformers 5's names
    sd = {ck: ours[k].detach().contiguous().cpu() for ck, k in hub_key_map(m, layout).items()}
    if not max_shard_bytes:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.numel() * v.element_size() > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Atomic directories: write beside, swap in whole

def write_json(obj, file, default=None):
    """Whole or not at all: written beside and renamed, so a reader never sees half a file.
    `default`: json.dump's, for values JSON has no type for."""
    with open(file + ".part", "w") as f:
        json.dump(obj, f, indent=1, default=default)
    os.replace(file + ".part", file)


def remove_checkpoint_dir(path):
    """Remove a checkpoint directory, its completeness marker first: a kill midway leaves an
    incomplete directory, never one that looks complete with tensors missing. A symbolic link
    is removed itself: what it points at is never touched."""
    if os.path.islink(path):
        return os.unlink(path)
    if os.path.isfile(os.path.join(path, "livr.json")):
        os.remove(os.path.join(path, "livr.json"))
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        os.remove(path)


def is_complete(path):
    """A LIVR checkpoint directory whose writer finished: livr.json (written last) is there."""
    return os.path.isfile(os.path.join(path, "livr.json"))


def swap_in(tmp, out_dir):
    """Replace out_dir by the complete directory tmp, so that a complete copy exists at every
    moment. On Linux the two swap in one step (renameat2 RENAME_EXCHANGE: OUT is always the old
    or the new one) and the old one, now at tmp, is removed. Elsewhere OUT moves aside to OUT.old
    first (a stale OUT.old from an earlier kill is cleared while OUT is complete, so it never
    blocks the rename) and comes back if the second rename fails; a kill between the two renames
    leaves OUT.old, and recover_checkpoint takes it back."""
    old = out_dir + ".old"
    if os.path.islink(out_dir):                     # replaced, never written through
        os.unlink(out_dir)
    if os.path.exists(out_dir):
        remove_checkpoint_dir(old)                  # a killed save's leftover, never needed now
        if _exchange(tmp, out_dir):
            remove_checkpoint_dir(tmp)              # the old copy
            return
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(out_dir):
            os.replace(old, out_dir)                 # the old one back: OUT as it was
        raise
    remove_checkpoint_dir(old)


def _exchange(a, b):
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


def recover_checkpoint(out_dir):
    """After a kill mid-save: if OUT is missing or incomplete, take the complete OUT.tmp (the
    newer save, fully written) or else OUT.old (the previous one) in its place. Leftovers that
    are not needed are removed. Returns True when OUT is a complete checkpoint afterwards."""
    out_dir = out_dir.rstrip("/")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    if not is_complete(out_dir):
        for candidate in (tmp, old):
            if is_complete(candidate):
                remove_checkpoint_dir(out_dir)
                os.replace(candidate, out_dir)
                break
    if is_complete(out_dir):
        remove_checkpoint_dir(tmp)
        remove_checkpoint_dir(old)
        return True
    return False


def copy_checkpoint(src, dst):
    """src's weights and livr.json (no trainer state) to dst, livr.json last, swapped in whole."""
    tmp = dst + ".tmp"
    remove_checkpoint_dir(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer.*", "livr.json*"))
    write_json(read_json(os.path.join(src, "livr.json")), os.path.join(tmp, "livr.json"))
    swap_in(tmp, dst)


# ----------------------------------------------------------------------------------------------
# LIVR checkpoints: what training changed, on top of a base hub checkpoint

def trainable_state(m: Qwen25VL):
    """The tensors training changed: LoRA factors and latents, or (full) the whole LM too."""
    return {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}


def save_livr(m: Qwen25VL, out_dir, meta, state=None, extra=None):
    """A LIVR checkpoint directory: livr.json (base path, K, latent id, LoRA settings, stage,
    and the names of the tensors it holds) and weights.safetensors with the trainable tensors
    (`state`, default: m's trainable ones). `extra` maps more file names to contents: a dict of
    tensors for a .safetensors name, a JSON-able object for a .json name (never pickle).
    Written to OUT.tmp with livr.json last -- its presence marks the directory complete -- then
    swapped in (swap_in), so a kill at any point leaves a complete checkpoint to recover."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    if m is not None:
        meta = {**meta, "num_latents": m.num_latents, "latent_token_id": m.latent_token_id,
                "shared_latent": m.shared_latent}
        state = trainable_state(m) if state is None else state
    meta = {**meta, "tensors": sorted(state)}
    out_dir = out_dir.rstrip("/")
    tmp = out_dir + ".tmp"
    remove_checkpoint_dir(tmp)
    os.makedirs(tmp)
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
                  os.path.join(tmp, "weights.safetensors"))
        for name, obj in (extra or {}).items():
            assert name.endswith((".safetensors", ".json")), f"save_livr: {name}: not .safetensors or .json"
            (save_file if name.endswith(".safetensors") else write_json)(obj, os.path.join(tmp, name))
        write_json(meta, os.path.join(tmp, "livr.json"))         # last: the completeness marker
    except (OSError, SafetensorError) as e:      # a full disk: the old checkpoint stays as it was
        remove_checkpoint_dir(tmp)
        raise OSError(f"{tmp}: cannot write the checkpoint ({e}); {out_dir} is as it was") from None
    swap_in(tmp, out_dir)


def required_tensors(m: Qwen25VL, meta):
    """The tensors a LIVR checkpoint must hold: those its livr.json lists (train.py writes the
    list), and in any case every parameter the base checkpoint lacks (latent rows, LoRA factors,
    a fork's modules); without a list, a --train full run's LM weights too."""
    listed = meta.get("tensors") or []
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise CheckpointError("livr.json: \"tensors\" must be a list of tensor names")
    base = set(hub_key_map(m).values())
    params = [k for k, _ in m.named_parameters()]
    need = set(listed) | {k for k in params if k not in base}
    if "tensors" not in meta and meta.get("train") == "full":
        need |= {k for k in params if masks.trainable(k, "full")}
    return need


def check_state(weights, params, required, source):
    """Raise CheckpointError naming every missing, unknown, mis-shaped and non-finite tensor.
    weights: {name: tensor} read from `source`; params: {name: parameter} of the model (their
    logical shapes, DTensors included); required: names that must be in `weights`."""
    errors = [f"missing tensor {k!r}" for k in sorted(required) if k not in weights]
    errors += [f"unknown tensor {k!r} (this model has no such trainable parameter; a fork's "
               "module is added by a function in model.EXTEND)" for k in sorted(weights) if k not in params]
    errors += [f"tensor {k!r} has shape {tuple(v.shape)}, the model expects "
               f"{tuple(params[k].shape)}" for k, v in sorted(weights.items())
               if k in params and tuple(v.shape) != tuple(params[k].shape)]
    errors += [f"tensor {k!r} is {v.dtype}, not floating point" for k, v in sorted(weights.items())
               if not v.is_floating_point()]
    errors += [f"tensor {k!r} holds non-finite values" for k, v in sorted(weights.items())
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise CheckpointError(f"{source} is incomplete or does not fit the model:\n  "
                              + "\n  ".join(errors[:20]) + more)


def base_fingerprint(path):
    """checks.fingerprint() of a base checkpoint directory (or hub id)'s safetensors files."""
    try:
        return checks.fingerprint(checkpoint_files(resolve(path)))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def trained_base(meta, source, base=None):
    """The base a LIVR checkpoint was trained on, checked before anything is built from it:
    livr.json's numbers, the latent ids against the base's table and tokenizer, and the base's
    fingerprint against the one recorded (older checkpoints record none). `base`: a copy of that
    base elsewhere, used instead of the path livr.json names (its fingerprint must match).
    Returns the base's path; a CheckpointError names what does not fit."""
    problems = checks.livr_problems(meta)
    if not problems:
        path = resolve(base or meta["base"])
        problems = (checks.livr_problems(meta, read_config(path).text.vocab_size) or
                    checks.tokenizer_latent_problems(path, meta["num_latents"], meta["latent_token_id"]))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    recorded = meta.get("base_fingerprint")
    if recorded is not None and (now := base_fingerprint(path)) != recorded:
        raise CheckpointError(
            f"{source} was trained on a base whose weights have fingerprint {checks.short_fingerprint(recorded)}, "
            f"but {path} has fingerprint {checks.short_fingerprint(now)}: other weights. Use the base it "
            "was trained on")
    return path


def load_livr(path, dtype=torch.float32, device="cpu", merge=False, base=None):
    """A checkpoint from train.py (livr.json + weights.safetensors), or a plain hub checkpoint
    (zero-shot, or a LIVR model written by export.py). Returns (model, meta). Complete or an
    error: every missing, unknown or mis-shaped tensor is named (CheckpointError); the base it
    loads under the weights is the one they were trained on (trained_base; `base`: a copy)."""
    meta_file = os.path.join(path, "livr.json")
    if not os.path.exists(meta_file):
        m = load_pretrained(path, dtype=dtype, device=device)
        exported = read_json(os.path.join(resolve(path), "config.json"), "config").get("livr") or {}
        layout = checks.livr_problems({"base": path, "num_latents": 0, **exported, "lora": None})
        if layout:
            raise CheckpointError(f"{path}/config.json: \"livr\": " + "; ".join(layout))
        if exported.get("num_latents"):
            k, first = exported["num_latents"], exported.get("latent_token_id")
            if not isinstance(k, int) or not isinstance(first, int) or not 0 <= first <= m.cfg.text.vocab_size - k:
                raise CheckpointError(f"{path}/config.json: \"livr\" must give num_latents and a "
                                      f"latent_token_id whose rows fit the table, not {exported!r}")
            m.set_latents(k, first)
            with torch.no_grad():     # the export wrote the latent rows into the table at their ids
                m.latent_embeds.copy_(m.model.embed_tokens.weight[first:first + k])
        return m, {"base": path, **exported, "num_latents": m.num_latents}
    meta = read_json(meta_file, "LIVR checkpoint description")
    missing = [k for k in ("base", "num_latents", "latent_token_id") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_file}: missing key {missing[0]!r}")
    m = load_pretrained(trained_base(meta, meta_file, base), dtype=dtype, device=device,
                        num_latents=meta["num_latents"], latent_token_id=meta["latent_token_id"],
                        shared_latent=meta.get("shared_latent", False))
    if meta.get("lora"):
        model.add_lora(m, **meta["lora"])
    weights_file = os.path.join(path, "weights.safetensors")
    weights = read_safetensors(weights_file, device)
    params = dict(m.named_parameters())
    check_state(weights, params, required_tensors(m, meta), weights_file)
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    if merge:
        model.merge_lora(m)
    return m.eval(), meta


# ----------------------------------------------------------------------------------------------
# The trainer's state, for --resume: optimizer moments, scheduler, step, every rank's RNG (what
# a live run holds and how it goes back into one: rundir.py)

def state_to_files(obj, tensors):
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings) into a JSON-able
    tree and {name: tensor} for safetensors: each tensor becomes {"__tensor__": name}, a tuple
    {"__tuple__": [...]}, a dict with non-string keys {"__items__": [[key, value], ...]}
    (the optimizer's state is keyed by parameter index). Tensors are moved to the CPU."""
    if torch.is_tensor(obj):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [state_to_files(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [state_to_files(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: state_to_files(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, state_to_files(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state holds a {type(obj).__name__}, which has no file form")


def state_from_files(obj, tensors, source):
    """Inverse of state_to_files; a tensor name the file lacks is named."""
    if isinstance(obj, list):
        return [state_from_files(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{source}: trainer.safetensors lacks tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(state_from_files(v, tensors, source) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: state_from_files(v, tensors, source) for k, v in obj["__items__"]}
    return {k: state_from_files(v, tensors, source) for k, v in obj.items()}


def all_finite(state):
    """True when every floating-point tensor in a nested state is finite."""
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def save_trainer_checkpoint(path, meta, weights, trainer):
    """A LIVR checkpoint (livr.json + weights.safetensors) plus the trainer's state, pickle-free:
    `trainer` (step, best, args, hyper-parameters, optimizer, scheduler, every rank's RNG) is
    split into trainer.json (its structure and numbers) and trainer.safetensors (its tensors:
    the optimizer's moments, the RNG states). Rank 0 writes it (train.save_checkpoint gathers)."""
    tensors = {}
    tree = state_to_files(trainer, tensors)
    save_livr(None, path, meta, state=weights, extra={"trainer.safetensors": tensors, "trainer.json": tree})


def read_trainer_json(path, resume=False):
    """path/trainer.json as a dict ({} for a checkpoint without one), its values checked
    (checks.trainer_problems; resume=True: all that --resume reads)."""
    file = os.path.join(path, "trainer.json")
    if not os.path.exists(file):
        return {}
    tree = read_json(file, "trainer state")
    problems = checks.trainer_problems(tree, resume)
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    return tree


def read_trainer_state(path):
    """The trainer state saved by save_checkpoint, as tensors on the CPU. Never unpickles: an
    old trainer.pt is refused."""
    if not os.path.exists(os.path.join(path, "trainer.json")):
        if os.path.exists(os.path.join(path, "trainer.pt")):
            raise CheckpointError(f"{path}/trainer.pt is a pickle file, which could run code when "
                                  "loaded and is not read: this checkpoint is from an older train.py. "
                                  "Start the stage again, or pass its weights to stage 2 with --init")
        raise CheckpointError(f"{path} has no trainer.json: not a resumable checkpoint")
    tree = read_trainer_json(path)
    missing = [k for k in ("step", "best", "optimizer", "scheduler", "rng") if k not in tree]
    if missing:
        raise CheckpointError(f"{path}/trainer.json: missing key {missing[0]!r}")
    state = state_from_files(tree, read_safetensors(os.path.join(path, "trainer.safetensors")), path)
    if not all_finite(state["optimizer"]):
        raise CheckpointError(f"{path}/trainer.safetensors: the optimizer state holds non-finite values")
    return state



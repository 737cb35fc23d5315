"""
What a loaded file may say: every number of a base's config.json, a LIVR checkpoint's livr.json
and the trainer's trainer.json is checked -- its type, that it is finite, its range -- before
anything is built from it, so a hostile or corrupt file is one named error, never a traceback
and never gigabytes allocated first (a config with 10^6 layers, a latent id of 10^9); and the
fingerprint that ties a checkpoint to the base weights it was trained on.

Each check returns a list of problems (empty: fine); checkpoint.py and rundir.py turn them into
their named errors, with the file.

The fingerprint (fingerprint()) is a sha256 over, for each safetensors file of the base in
order: its name, its size, its whole header (every tensor's name, dtype, shape and offsets) and
4 KiB at the start, middle and end of every tensor's bytes. It reads about 12 KiB per tensor
(~10 MB for a 3B or 7B base, well under a second even from a cold disk) instead of hashing 7 GB,
and still tells apart any two bases that differ in the weights they were trained as: another
fine-tune or another seed changes every tensor, and so every sample. It is not a defence
against an edit crafted to keep the samples (that is what the safetensors loader's own checks
and non-finite checks are for), and a base re-saved with other metadata or tensor order counts
as another base.
"""
import hashlib
import json
import math
import os

import masks

MAX_LATENTS = 4096             # K above this is a typo, and would allocate K x hidden at once
SAMPLE = 4096                  # bytes of a tensor read at its start, middle and end
FINGERPRINT_VERSION = "v1"


# ----------------------------------------------------------------------------------------------
# Numbers

def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def whole(name, v, low, high):
    """A problem unless v is a whole number (not a bool, not 64.0) in [low, high]."""
    if not is_int(v):
        return [f"{name} must be a whole number, not {short(v)}"]
    if not low <= v <= high:
        return [f"{name} {v} is outside {low}..{high}"]
    return []


def real(name, v, low, high, low_ok=True):
    """A problem unless v is a finite number in [low, high] (or (low, high] without low_ok)."""
    if not is_number(v):
        return [f"{name} must be a finite number, not {short(v)}"]
    if v < low or (v == low and not low_ok) or v > high:
        return [f"{name} {v} is outside {'[' if low_ok else '('}{low}, {high}]"]
    return []


def short(v, n=60):
    """A value as the message shows it: repr, cut short (a 5000-digit number, a huge list)."""
    try:
        s = repr(v)
    except ValueError:                         # int too large to print
        s = f"<a number of more than {n} digits>"
    return s if len(s) <= n else s[:n] + "..."


# ----------------------------------------------------------------------------------------------
# config.json (a model.Config, built from the file but not yet a model)

TEXT_LIMITS = dict(vocab_size=(1, 1 << 22), hidden_size=(1, 1 << 16), intermediate_size=(1, 1 << 18),
                   num_hidden_layers=(1, 1024), num_attention_heads=(1, 1024),
                   num_key_value_heads=(1, 1024), explicit_head_dim=(0, 4096))
VISION_LIMITS = dict(depth=(0, 1024), hidden_size=(1, 1 << 16), num_heads=(1, 1024),
                     intermediate_size=(1, 1 << 18), out_hidden_size=(1, 1 << 16),
                     in_channels=(3, 3), patch_size=(1, 1024), temporal_patch_size=(1, 16),
                     spatial_merge_size=(1, 16), window_size=(0, 1 << 16),
                     num_position_embeddings=(0, 1 << 20))
VISION_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")


def config_problems(cfg):
    """Every number of a model.Config in its type and range, before the model is built."""
    t, v = cfg.text, cfg.vision
    out = []
    for k, (lo, hi) in TEXT_LIMITS.items():
        out += whole(k, getattr(t, k), lo, hi)
    for k, (lo, hi) in VISION_LIMITS.items():
        out += whole(f"vision_config.{k}", getattr(v, k), lo, hi)
    out += real("rms_norm_eps", t.rms_norm_eps, 0, 1, low_ok=False)
    out += real("rope_theta", t.rope_theta, 0, 1e12, low_ok=False)
    out += real("vision_config.rms_norm_eps", v.rms_norm_eps, 0, 1, low_ok=False)
    out += real("vision_config.rope_theta", v.rope_theta, 0, 1e12, low_ok=False)
    for k in ("tie_word_embeddings", "attention_bias", "o_proj_bias", "qk_norm", "mrope_interleaved"):
        if not isinstance(getattr(t, k), bool):
            out.append(f"{k} must be true or false, not {short(getattr(t, k))}")
    if out:
        return out                          # the relations below need sane numbers
    if t.num_attention_heads % t.num_key_value_heads:
        out.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                   f"num_key_value_heads {t.num_key_value_heads}")
    if not t.explicit_head_dim and t.hidden_size % t.num_attention_heads:
        out.append(f"hidden_size {t.hidden_size} is not a multiple of num_attention_heads "
                   f"{t.num_attention_heads}")
    if t.head_dim % 2:
        out.append(f"head_dim {t.head_dim} must be even (rotary embeddings turn channel pairs)")
    sec = t.mrope_section        # interleaved (Qwen3-VL): each bounds its axis' share of channels
    if not isinstance(sec, list) or len(sec) != 3 or not all(is_int(s) and 0 <= s <= t.head_dim for s in sec):
        out.append(f"mrope_section must be 3 whole numbers in 0..{t.head_dim}, not {short(sec)}")
    elif not t.mrope_interleaved and 2 * sum(sec) != t.head_dim:
        out.append(f"mrope_section {sec} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 2:
        out.append(f"vision_config.hidden_size {v.hidden_size} must split into "
                   f"{v.num_heads} heads of an even size")
    if v.out_hidden_size != t.hidden_size:
        out.append(f"vision_config.out_hidden_size {v.out_hidden_size} must equal the text "
                   f"hidden_size {t.hidden_size}")
    if v.window_size and v.window_size < v.patch_size * v.spatial_merge_size:
        out.append(f"vision_config.window_size {v.window_size} is below one merged patch "
                   f"({v.patch_size * v.spatial_merge_size} pixels)")
    if math.isqrt(v.num_position_embeddings) ** 2 != v.num_position_embeddings:
        out.append(f"vision_config.num_position_embeddings {v.num_position_embeddings} is not a square")
    for k in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        idx = getattr(v, k)
        if not all(is_int(i) and 0 <= i < max(v.depth, 1) for i in idx) or len(idx) > 1024:
            out.append(f"vision_config.{k} must be block numbers in 0..{v.depth - 1}, not {short(list(idx))}")
    if v.hidden_act not in VISION_ACTS:
        out.append(f"vision_config.hidden_act {short(v.hidden_act)} is not one of {', '.join(VISION_ACTS)}")
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "eos_token_id"):
        out += whole(k, getattr(cfg, k), 0, t.vocab_size - 1)
    return out


# ----------------------------------------------------------------------------------------------
# livr.json (a LIVR checkpoint's description)

def livr_problems(meta, vocab_size=None):
    """livr.json's values in their types and ranges; with the base's vocab_size, also that the
    latent ids fit next to its table (set_latents grows it by at most K rows)."""
    out = []
    if not isinstance(meta.get("base"), str) or not meta["base"]:
        out.append(f"\"base\" must be the base checkpoint's path, not {short(meta.get('base'))}")
    k = meta.get("num_latents")
    out += whole("num_latents", k, 0, MAX_LATENTS)
    first = meta.get("latent_token_id")
    if is_int(k) and k and not out:
        out += whole("latent_token_id", first, 0, vocab_size if vocab_size is not None else 1 << 22)
    elif first is not None and not is_int(first):
        out.append(f"latent_token_id must be a whole number or null, not {short(first)}")
    lora = meta.get("lora")
    if lora is not None:
        if not isinstance(lora, dict) or set(lora) != {"rank", "alpha", "dropout"}:
            out.append(f"\"lora\" must be {{rank, alpha, dropout}}, not {short(lora)}")
        else:
            out += whole("lora.rank", lora["rank"], 1, 1 << 16)
            out += real("lora.alpha", lora["alpha"], 0, 1e6, low_ok=False)
            out += real("lora.dropout", lora["dropout"], 0, 0.999)
    if meta.get("train") not in (None, *masks.TRAIN_MODES):
        out.append(f"\"train\" must be one of {', '.join(masks.TRAIN_MODES)}, not {short(meta['train'])}")
    if meta.get("latent_position", "after") not in masks.LATENT_POSITIONS:
        out.append(f"\"latent_position\" must be one of {', '.join(masks.LATENT_POSITIONS)}, "
                   f"not {short(meta['latent_position'])}")
    if not isinstance(meta.get("shared_latent", False), bool):
        out.append(f"\"shared_latent\" must be true or false, not {short(meta['shared_latent'])}")
    if "stage" in meta and meta["stage"] not in (1, 2):
        out.append(f"\"stage\" must be 1 or 2, not {short(meta['stage'])}")
    for key in ("mask", "base_fingerprint"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            out.append(f"\"{key}\" must be a string, not {short(meta[key])}")
    return out


def tokenizer_latent_problems(base, num_latents, latent_token_id):
    """The latent ids the base's tokenizer gives <|latent_0|>.. (as data.Processor adds them)
    against the checkpoint's: an id off by one would train or score other rows."""
    import data
    if not num_latents or not os.path.exists(os.path.join(base, "tokenizer.json")):
        return []
    try:
        first = data.Processor.from_pretrained(base, num_latents=num_latents).latent_token_id
    except (OSError, ValueError) as e:
        return [f"the tokenizer at {base} cannot place {num_latents} latent tokens ({e})"]
    if first != latent_token_id:
        return [f"latent_token_id is {latent_token_id}, but the tokenizer at {base} puts "
                f"<|latent_0|> at id {first}"]
    return []


# ----------------------------------------------------------------------------------------------
# trainer.json (the trainer's state, as a tree before its tensors are read)

def trainer_problems(tree, resume=False):
    """trainer.json's values: the step, the best accuracy, the optimizer's hyper-parameters, and
    what a state saved by train.py holds (resume=True: what --resume reads): the recorded
    settings and data it compares (a list or a negative step would turn those checks off or
    replay steps), each process's random state, the scheduler at the same step."""
    out = whole("step", tree.get("step"), 0, 1 << 40)
    out += real("best", tree.get("best"), -1, 1)
    opt = tree.get("optimizer")
    if "optimizer" in tree and (not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list)):
        out.append("\"optimizer\" must hold param_groups")
    elif opt is not None:
        for i, g in enumerate(opt["param_groups"]):
            out += [f"optimizer.param_groups[{i}]: {p}" for p in param_group_problems(g)]
    return out + (resume_problems(tree) if resume else [])


def resume_problems(tree):
    out = []
    if not isinstance(tree.get("hparams"), dict):
        out.append(f"\"hparams\" must be the run's settings (an object), not {short(tree.get('hparams'))}")
    else:
        for k, v in tree["hparams"].items():
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"hparams.{k} must be finite, not {v}")
    d = tree.get("data")
    if not (isinstance(d, dict) and is_int(d.get("records")) and d["records"] >= 0
            and isinstance(d.get("sha256"), str)):
        out.append(f"\"data\" must be {{records, sha256}} of the training set, not {short(d)}")
    rng = tree.get("rng")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) for r in rng):
        out.append(f"\"rng\" must be a list of each process's random state, not {short(rng)}")
    sched = tree.get("scheduler")
    if not isinstance(sched, dict) or sched.get("last_epoch") != tree.get("step"):
        out.append("\"scheduler\" must hold last_epoch equal to step "
                   f"({short(sched.get('last_epoch') if isinstance(sched, dict) else sched)} "
                   f"vs {short(tree.get('step'))})")
    return out


def param_group_problems(g):
    if not isinstance(g, dict):
        return [f"not an object: {short(g)}"]
    out = []
    for k in ("lr", "weight_decay", "initial_lr"):
        if k in g:
            out += real(k, g[k], 0, 1e3)
    for k in ("lr_scale", "weight_decay_scale"):       # train.optimizer_groups
        if k in g:
            out += real(k, g[k], 0, 1e6)
    if "eps" in g:
        out += real("eps", g["eps"], 0, 1, low_ok=False)
    betas = g.get("betas")
    if isinstance(betas, dict):                 # checkpoint.state_to_files writes tuples so
        betas = betas.get("__tuple__")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2
                                  and all(is_number(b) and 0 <= b < 1 for b in betas)):
        out.append(f"betas must be two numbers in [0, 1), not {short(betas)}")
    return out


# ----------------------------------------------------------------------------------------------
# The base's fingerprint

def fingerprint(files):
    """FINGERPRINT_VERSION:sha256 of the base's safetensors files (the module docstring says
    what it covers). A file whose header is unreadable is a ValueError naming it."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for file in files:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 1 << 28):
                raise ValueError(f"{file}: not a safetensors file (header length {n}, file size {size})")
            header = f.read(n)
            try:
                tensors = json.loads(header)
                spans = sorted(tuple(t["data_offsets"]) for k, t in tensors.items() if k != "__metadata__")
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
            h.update(f"{os.path.basename(file)}\0{size}\0".encode() + header)
            for start, end in spans:
                for a, b in sample_spans(start, end):
                    f.seek(8 + n + a)
                    h.update(f.read(b - a))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def sample_spans(start, end):
    """[(a, b)]: SAMPLE bytes at the start, middle and end of [start, end), merged when they
    overlap (a small tensor is read whole)."""
    if end - start <= 3 * SAMPLE:
        return [(start, end)]
    mid = (start + end) // 2 - SAMPLE // 2
    return [(start, start + SAMPLE), (mid, mid + SAMPLE), (end - SAMPLE, end)]


def short_fingerprint(fp):
    """What messages show of a fingerprint: its version and 16 hex digits."""
    return fp[:len(FINGERPRINT_VERSION) + 17] if isinstance(fp, str) else "none recorded"

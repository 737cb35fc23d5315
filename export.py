"""
Export a trained LIVR checkpoint as a plain Hugging Face checkpoint that other tools run unchanged.

After stage 2, LIVR at inference is an ordinary causal VLM whose prompt ends with K extra tokens
(the paper's layout Q' = Q + L, masks.place_latents). A checkpoint from train.py is only what training
changed (LoRA factors or LM weights, and the K latent rows) on top of a base path, which this
project alone can read. This file folds it into the hub's own layout, so transformers'
AutoModelForImageTextToText / AutoProcessor -- and through them lmms-eval, vLLM and the hub --
load it as any Qwen2.5-VL or Qwen3-VL:

    OUT/
      config.json                     the base's config; vocab_size if the table grew; dtype;
                                      "livr": {num_latents, latent_token_id} for this project
      model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                      merged weights (LoRA folded in), the latent rows written
                                      into the embedding table at the latent tokens' ids
      tokenizer.json, tokenizer_config.json
                                      the base tokenizer + <|latent_0|>..<|latent_K-1|> as added
                                      special tokens
      chat_template.jinja, chat_template.json
                                      the base family's template with the latents at the end of each
                                      user turn, where data.Processor.user_parts puts them
      preprocessor_config.json        the base's image settings
      generation_config.json          greedy, and the latent ids in suppress_tokens: our
                                      model.generate never emits them, and with a tied head the
                                      latent rows are now also the head's rows for those ids
      README.md                       hub metadata (cardmeta.py), base model, K, recipe,
                                      validation accuracy, the lmms-eval command (lmms.py)

The weights are safetensors only (no pickle anywhere) and the directory is written elsewhere and
renamed into place, so an existing OUT stays whole until the new one is complete.

    python export.py runs/demo/stage2/final runs/demo/hub
    python evaluate.py --checkpoint runs/demo/hub          # this project reads it back too
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile

import torch

import cardmeta
import checkpoint
import data
import faults
import lmms
import model

# Files of the base checkpoint that travel unchanged (those that exist): image/video settings,
# the slow tokenizer's vocabulary, the licence. Everything else is written here.
COPIED = ("preprocessor_config.json", "video_preprocessor_config.json", "special_tokens_map.json",
          "vocab.json", "merges.txt", "LICENSE")
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# sampling defaults a base may ship (Qwen's: temperature 0.1, top_k 1, repetition_penalty 1.05);
# LIVR is evaluated greedily, so the export drops them
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


class ExportError(Exception):
    """Bad input: a message that says what is wrong; main() prints it and exits 2."""


# ----------------------------------------------------------------------------------------------
# The model: merged weights, latent rows in the table

def merged_model(run_ckpt):
    """(model, livr.json's meta, K, id of <|latent_0|>): the model with LoRA merged and the
    latent rows written into its embedding table. Loads in fp32 so that the merge
    W + (alpha/r) B A is exact before any cast."""
    if not os.path.exists(os.path.join(run_ckpt, "livr.json")):
        raise ExportError(f"{run_ckpt} is not a LIVR checkpoint: it has no livr.json "
                          "(train.py writes RUN_DIR/stageN/final)")
    try:
        m, meta = checkpoint.load_livr(run_ckpt, dtype=torch.float32, device="cpu", merge=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load {run_ckpt}: {type(e).__name__}: {e}") from e
    k, first = m.num_latents, m.latent_token_id
    if k:
        # set_latents grew the table already if the base had no spare rows for the latent ids
        with torch.no_grad():
            m.model.embed_tokens.weight[first:first + k] = m.latent_rows()    # (K, d)
        m.set_latents(0)            # the table holds them now; the hub layout has no latent_embeds
    return m, meta, k, first


def weight_dtype(path):
    """The dtype the base checkpoint stores its weights in (bf16 on the hub)."""
    from safetensors import safe_open
    file = checkpoint.checkpoint_files(path)[0]
    with safe_open(file, "pt") as f:
        key = next(iter(f.keys()))
        return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)


# ----------------------------------------------------------------------------------------------
# The prompt: tokenizer and chat template

def chat_template(num_latents, qwen3=False, position="after"):
    """data.QWEN25VL_CHAT_TEMPLATE with the K latent tokens in every user turn where
    data.Processor.user_parts puts them: "after" at the end of the turn, right before its
    <|im_end|> (after the question text, whether the content is a string or a list of images
    and texts); "before" at its start, right after "<|im_start|>user\\n". qwen3: the same in
    data.QWEN3VL_CHAT_TEMPLATE."""
    latents = "".join(data.LATENT_TOKEN.format(i) for i in range(num_latents))
    if qwen3:
        t = data.QWEN3VL_CHAT_TEMPLATE
        if not num_latents:
            return t
        if position == "before":
            start_of_user = "    {%- if message.role == \"user\" %}\n        {{- '<|im_start|>' + message.role + '\\n' }}"
            assert t.count(start_of_user) == 1, start_of_user
            return t.replace(start_of_user, start_of_user.replace("'\\n' }}", "'\\n" + latents + "' }}"))
        end_of_user = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}"
        assert t.count(end_of_user) == 1, end_of_user
        return t.replace(end_of_user, end_of_user.replace("'<|im_end|>", "'" + latents + "<|im_end|>"))
    t = data.QWEN25VL_CHAT_TEMPLATE
    if not num_latents:
        return t
    in_user = "{% if message['role'] == 'user' %}" + latents + "{% endif %}"
    if position == "before":
        start = "<|im_start|>{{ message['role'] }}\n"
        assert t.count(start) == 1, start
        return t.replace(start, start + in_user)
    for end_of_content in ("{{ message['content'] }}<|im_end|>", "{% endfor %}<|im_end|>"):
        assert t.count(end_of_content) == 1, end_of_content
        t = t.replace(end_of_content, end_of_content.replace("<|im_end|>", in_user + "<|im_end|>"))
    return t


def write_tokenizer(processor, base, out, template):
    """tokenizer.json (with the latent tokens), tokenizer_config.json and the chat template."""
    processor.tokenizer.save(os.path.join(out, "tokenizer.json"))
    config = _read_json(os.path.join(base, "tokenizer_config.json")) or {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "add_prefix_space": False}
    added = config.setdefault("added_tokens_decoder", {})
    for i, token in enumerate(processor.latent_tokens):
        added[str(processor.latent_token_id + i)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    config["chat_template"] = template
    # the same template where each transformers version looks: the tokenizer's config, the
    # processor's chat_template.jinja (transformers 5) and chat_template.json (4.x)
    checkpoint.write_json(config, os.path.join(out, "tokenizer_config.json"))
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(template)
    checkpoint.write_json({"chat_template": template}, os.path.join(out, "chat_template.json"))
    processor_config = _read_json(os.path.join(base, "processor_config.json"))
    if processor_config is not None:     # a template in here would win over ours: drop it
        processor_config.pop("chat_template", None)
        checkpoint.write_json(processor_config, os.path.join(out, "processor_config.json"))


# ----------------------------------------------------------------------------------------------
# Configs and the model card

def write_configs(m, base, out, processor, num_latents, first, dtype):
    """config.json: the base's own (every field transformers reads, not just ours), with the
    table's size, the dtype and the LIVR marker; generation_config.json: greedy, latents
    suppressed."""
    config = _read_json(os.path.join(base, "config.json"))
    vocab = m.cfg.text.vocab_size
    if "vocab_size" in config or "text_config" not in config:
        config["vocab_size"] = vocab
    if "text_config" in config:
        config["text_config"]["vocab_size"] = vocab
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name                          # transformers 4.x
    if "dtype" in config:
        config["dtype"] = name                            # transformers 5
    # read back by checkpoint.load_livr (K = 0: a Direct SFT run; it also marks OUT as an export)
    config["livr"] = {"num_latents": num_latents, "latent_token_id": first,
                      "latent_position": processor.latent_position}
    checkpoint.write_json(config, os.path.join(out, "config.json"))

    gen = _read_json(os.path.join(base, "generation_config.json")) or {}
    for key in SAMPLING_KEYS:
        gen.pop(key, None)
    gen.update(do_sample=False, pad_token_id=processor.pad_id,
               eos_token_id=sorted({processor.im_end_id, processor.pad_id}))
    gen.pop("suppress_tokens", None)
    if num_latents:
        gen["suppress_tokens"] = list(range(first, first + num_latents))
    checkpoint.write_json(gen, os.path.join(out, "generation_config.json"))


def hub_id(base):
    """'Org/Name' for a base that came from the hub (resolve() puts it in the hub cache)."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", base)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def validation_accuracy(run_ckpt):
    """Best validation accuracy in the run's metrics.jsonl next to the checkpoint (train.py keeps
    the best-validation checkpoint as final), as 'xx.x% (step n)'; 'unknown' without it."""
    path = os.path.join(os.path.dirname(os.path.normpath(run_ckpt)), "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("val_acc"), (int, float)):
                    rows.append(row)
    if not rows:
        return "unknown"
    best = max(rows, key=lambda r: r["val_acc"])
    return f"{100 * best['val_acc']:.1f}% (step {best.get('step', '?')})"


def model_card(meta, run_ckpt, num_latents, first, grown, dtype, qwen3=False):
    base = meta["base"]
    family, tag = ("Qwen3-VL", "qwen3_vl") if qwen3 else ("Qwen2.5-VL", "qwen2_5_vl")
    name = hub_id(base) or base
    lora = meta.get("lora")
    train = (f"LoRA r={lora['rank']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
             f"{', '.join(model.LORA_TARGETS)} (merged into the weights)" if lora
             else "the whole language model (vision encoder and merger frozen)")
    front = [cardmeta.front_matter(meta, run_ckpt, hub_id(base), tag, f"LIVR-{os.path.basename(name)}")]
    latents = (f"<|latent_0|>..<|latent_{num_latents - 1}|>, ids {first}..{first + num_latents - 1}"
               if num_latents else "none (a Direct SFT run)")
    body = f"""# LIVR: {name} with {num_latents} latent tokens

A {family} model fine-tuned with LIVR (Latent Implicit Visual Reasoning): K learnable latent
tokens after the question, trained first under a visual bottleneck (only the latents see the
image), then with the causal mask. Exported from `{run_ckpt}` as a plain transformers
checkpoint: the chat template adds the latents itself, so the model runs like any {family}.

| | |
|---|---|
| base model | `{name}` |
| latent tokens (K) | {num_latents}: {latents} |
| stage | {meta.get('stage', 'unknown')} |
| attention mask | {meta.get('mask', 'unknown')} |
| trained | {train} |
| validation accuracy | {validation_accuracy(run_ckpt)} |
| weights | {str(dtype).removeprefix('torch.')}{', embedding table grown to fit the latent ids' if grown else ''} |

- The latent embeddings sit in the embedding table at their ids; the chat template appends the
  latent tokens at the end of each user turn, right before `<|im_end|>`, as in training.
- `generation_config.json` decodes greedily (as the LIVR evaluation does) and suppresses the
  latent ids. A server that ignores `suppress_tokens` should be given a logit bias of -100 on
  them.

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("OUT")
processor = AutoProcessor.from_pretrained("OUT")
messages = [{{"role": "user", "content": [{{"type": "image", "image": "a.png"}},
                                         {{"type": "text", "text": "How many squares?"}}]}}]
inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:],
                       skip_special_tokens=True))
```
"""
    return "\n".join(front) + body


# ----------------------------------------------------------------------------------------------
# Writing it all, atomically

def export(run_ckpt, out_dir, max_shard_bytes=5 * 10**9, dtype=None):
    """Write `run_ckpt` (a train.py checkpoint directory) to `out_dir` in the hub's layout.
    dtype: torch dtype of the written weights (default: the base checkpoint's). Returns out_dir."""
    out_dir = os.path.normpath(out_dir)
    _check_out(out_dir, run_ckpt)
    m, meta, k, first = merged_model(run_ckpt)
    base = checkpoint.resolve(meta["base"])
    grown = m.cfg.text.vocab_size > checkpoint.read_config(base).text.vocab_size
    try:
        processor = data.Processor.from_pretrained(base, num_latents=k,
                                                   latent_position=meta.get("latent_position", "after"))
    except (OSError, ValueError) as e:
        raise ExportError(f"no tokenizer for {run_ckpt} (looked in {base}): {e}") from e
    if k and processor.latent_token_id != first:
        raise ExportError(f"the tokenizer at {base} puts <|latent_0|> at id "
                          f"{processor.latent_token_id}, the checkpoint at {first}")
    dtype = dtype or weight_dtype(base)
    check_range(m, dtype)
    m.to(dtype)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        checkpoint.save_pretrained(m, tmp, max_shard_bytes=max_shard_bytes)
        write_configs(m, base, tmp, processor, k, first, dtype)
        write_tokenizer(processor, base, tmp, chat_template(k, m.cfg.qwen3, processor.latent_position))
        for name in COPIED:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), os.path.join(tmp, name))
        if not os.path.exists(os.path.join(tmp, "preprocessor_config.json")):
            c = processor.image_config
            checkpoint.write_json({
                "min_pixels": c.min_pixels, "max_pixels": c.max_pixels, "patch_size": c.patch_size,
                "temporal_patch_size": c.temporal_patch_size, "merge_size": c.merge_size,
                "image_mean": list(c.image_mean), "image_std": list(c.image_std),
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen3VLProcessor" if m.cfg.qwen3 else "Qwen2_5_VLProcessor"},
                os.path.join(tmp, "preprocessor_config.json"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(meta, run_ckpt, k, first, grown, dtype, m.cfg.qwen3)
                    + lmms.card_section(tmp, out_dir, m.cfg.qwen3))    # the lmms-eval command
        pickles = [n for n in os.listdir(tmp) if n.endswith(PICKLE_SUFFIXES)]
        assert not pickles, f"pickle files in the export: {pickles}"
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)             # mkdtemp's 0700 would hide OUT from others
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        checkpoint.swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_range(m, dtype):
    """Refuse a dtype whose range the weights exceed (fp16: |w| <= 65504): the cast would
    silently write inf."""
    if not dtype.is_floating_point:
        return
    top = torch.finfo(dtype).max
    over = [(k, float(v.detach().abs().max())) for k, v in m.named_parameters()    # tied: once
            if v.is_floating_point() and v.numel() and float(v.detach().abs().max()) > top]
    if over:
        k, v = max(over, key=lambda kv: kv[1])
        flag = next((f for f, d in checkpoint.DTYPES.items() if d == dtype), dtype)
        raise ExportError(f"--dtype {flag}: {len(over)} tensor(s) hold "
                          f"values beyond its range (|w| <= {top:g}), largest {k} ({v:.4g}): they "
                          "would be written as inf. Export in bf16 or fp32")


def _check_out(out_dir, run_ckpt):
    """Refuse to replace a directory that is not an earlier export (a run directory, say), or
    the directory we are in (or one holding it); refuse to write inside the checkpoint, whose
    next save (an atomic swap of the whole directory) would delete the export."""
    ckpt = os.path.realpath(run_ckpt)
    out = os.path.realpath(out_dir)
    here = os.getcwd()
    if here == out or here.startswith(out.rstrip(os.sep) + os.sep):
        raise ExportError(f"{out_dir} is the current directory, or holds it: export to a new "
                          "directory (e.g. runs/hub)")
    if ckpt == out or ckpt.startswith(out + os.sep):
        raise ExportError(f"{out_dir} holds the checkpoint {run_ckpt}: export somewhere else")
    if out.startswith(ckpt + os.sep) and os.path.exists(os.path.join(ckpt, "livr.json")):
        raise ExportError(f"{out_dir} is inside the checkpoint {run_ckpt}, whose next save would "
                          "delete it: export somewhere else")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a directory")
    try:
        earlier_export = "livr" in (_read_json(os.path.join(out_dir, "config.json")) or {})
    except (OSError, ValueError):
        earlier_export = False
    if os.listdir(out_dir) and not earlier_export:
        raise ExportError(f"{out_dir} exists and is not an earlier export: refusing to replace it "
                          "(pass a new or empty directory)")


def _read_json(path):
    """path's JSON object (a named error when malformed), or None when the base has no such file."""
    return checkpoint.read_json(path) if os.path.exists(path) else None


# ----------------------------------------------------------------------------------------------
# CLI: python export.py CHECKPOINT OUT

def parse_size(text):
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * scale[unit])


def main(argv=None):
    faults.safe_output()              # paths never reach the terminal raw
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("checkpoint", help="a LIVR checkpoint from train.py, e.g. runs/demo/stage2/final")
    p.add_argument("out", help="the directory to write (replaced atomically if it is an earlier export)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="largest safetensors shard (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(checkpoint.DTYPES), help="weights' dtype (default: the base's)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.max_shard_size,
                     checkpoint.DTYPES[args.dtype] if args.dtype else None)
    except (ExportError, checkpoint.CheckpointError, OSError) as e:   # a malformed file of the base, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

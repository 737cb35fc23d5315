"""Tiny random Qwen2.5-VL and Qwen3-VL (family="qwen3") checkpoints written in the hub's own
layout, and inputs for them.

The weights come from transformers' own model (so its loader must accept our files), redrawn at
a scale where every mistake shows: a wrong rotary split, window order or norm would move the
logits far beyond the 1e-4 tolerance."""
import json
import os

import torch

VOCAB = 320
IDS = dict(eos_token_id=300, vision_start_token_id=301, vision_end_token_id=302,
           image_token_id=303, video_token_id=304)


def config_dict(heads=4, kv_heads=2, tied=True, form="flat", layers=2, hidden=64,
                window_size=56, fullatt=(1,)):
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=4096)
    hd2 = hidden // heads // 2
    section = [hd2 - 2 * (hd2 * 3 // 8), hd2 * 3 // 8, hd2 * 3 // 8]
    rope = {"type": "mrope", "mrope_section": section}
    vision = dict(depth=3, hidden_size=48, num_heads=2, intermediate_size=80, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=window_size,
                  fullatt_block_indexes=list(fullatt), out_hidden_size=hidden, in_chans=3,
                  hidden_act="silu")
    top = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
               tie_word_embeddings=tied, vision_config=vision, **IDS)
    if form == "flat":     # as on the hub
        return {**top, **text, "rope_theta": 1e6, "rope_scaling": rope}
    # as transformers 5 writes it
    rope = {**rope, "rope_type": "default", "rope_theta": 1e6}
    return {**top, "text_config": {**text, "rope_parameters": rope}}


def config_dict3(heads=4, kv_heads=2, tied=True, form="hub", layers=3, hidden=64, head_dim=24,
                 section=(4, 4, 4), deepstack=(0, 2), depth=3, num_position_embeddings=36):
    """A tiny Qwen3-VL config.json: form "hub" as Qwen/Qwen3-VL-4B-Instruct's (text `rope_scaling`
    + `rope_theta`, vision model_type "qwen3_vl"), or "t5" as transformers 5 writes it
    (`rope_parameters`). head_dim is explicit and != hidden/heads, as in the 4B."""
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                max_position_embeddings=4096, tie_word_embeddings=tied,
                eos_token_id=IDS["eos_token_id"], model_type="qwen3_vl_text")
    rope = {"mrope_interleaved": True, "mrope_section": list(section), "rope_type": "default"}
    vision = dict(depth=depth, hidden_size=48, num_heads=2, intermediate_size=80, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=hidden, in_channels=3,
                  hidden_act="gelu_pytorch_tanh", num_position_embeddings=num_position_embeddings,
                  deepstack_visual_indexes=list(deepstack), model_type="qwen3_vl")
    if form == "hub":
        text.update(rope_theta=5e6, rope_scaling=rope)
    else:
        text.update(rope_parameters={**rope, "rope_theta": 5e6})
        vision.update(model_type="qwen3_vl_vision", rope_parameters={"rope_type": "axial", "rope_theta": 1e4})
    ids = {k: v for k, v in IDS.items() if k != "eos_token_id"}
    return dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl",
                tie_word_embeddings=tied, text_config=text, vision_config=vision, **ids)


def _redraw(sd, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.dim() == 1 and ("norm" in k or "ln_q" in k):
            t = 1 + 0.2 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:
            t = 0.5 * torch.randn(v.shape, generator=g)
        elif "embed_tokens" in k:
            t = torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            t = torch.randn(v.shape, generator=g) * (1.5 / fan_in ** 0.5)
        out[k] = t.to(v.dtype)
    return out


def write_checkpoint(path, seed=0, layout="hub", shards=1, dtype=torch.float32, family="qwen2.5",
                     **cfg_kwargs):
    """Write config.json + safetensors for a random model; returns the path. family "qwen3":
    a Qwen3-VL checkpoint (config_dict3's arguments), whose hub layout is transformers 5's
    (`model.visual.*`, `model.language_model.*`); layout "legacy" writes `visual.*`, `model.*`."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(path, exist_ok=True)
    if family == "qwen3":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        cfg = config_dict3(**cfg_kwargs)
        torch.manual_seed(seed)
        ref = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(cfg))
        layout = {"hub": "new", "new": "new", "legacy": "hub"}[layout]
    else:
        cfg = config_dict(**cfg_kwargs)
        torch.manual_seed(seed)
        ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg))
    sd = _redraw({k: v for k, v in ref.state_dict().items()}, seed)
    if cfg["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)

    def hub(k):     # transformers 5 names in memory -> the hub's legacy names
        if k.startswith("model.visual."):
            return k[len("model."):]
        if k.startswith("model.language_model."):
            return "model." + k[len("model.language_model."):]
        return k
    sd = {(hub(k) if layout == "hub" else k): v.to(dtype).contiguous() for k, v in sd.items()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    keys = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[i::shards]}
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def oracle(path, dtype=torch.float32):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    with open(os.path.join(path, "config.json")) as f:
        qwen3 = json.load(f)["model_type"] == "qwen3_vl"
    cls = Qwen3VLForConditionalGeneration if qwen3 else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def inputs(grids, text_lens, batch_pad=None, seed=0, patch=14):
    """One sample: text, then for each (t, h, w) grid a vision block, then more text.
    Returns input_ids (1, L), pixel_values (N, 3*2*patch^2), image_grid_thw (n, 3);
    patch=16 for Qwen3-VL."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 290, (text_lens[0],), generator=g)]
    for (t, h, w), n in zip(grids, text_lens[1:]):
        ids += [torch.tensor([IDS["vision_start_token_id"]]),
                torch.full((t * h * w // 4,), IDS["image_token_id"]),
                torch.tensor([IDS["vision_end_token_id"]]),
                torch.randint(0, 290, (n,), generator=g)]
    n_patches = sum(t * h * w for t, h, w in grids)
    pv = torch.randn(n_patches, 3 * 2 * patch * patch, generator=g)
    thw = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    return torch.cat(ids)[None], pv, thw


def hf_logits(ref, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None):
    kw = dict(input_ids=input_ids, attention_mask=attention_mask,
              mm_token_type_ids=(input_ids == IDS["image_token_id"]).int())
    if pixel_values is not None and pixel_values.numel():
        kw.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    with torch.no_grad():
        return ref(**kw).logits



def free_port():
    """A TCP port nothing listens on now, for a torchrun rendezvous: fixed ports collide when
    two test runs share a machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(nproc, script, *argv, timeout=600, **kw):
    """Run `script` under torch.distributed.run with nproc processes on a free port; a failure
    raises with the end of the processes' output (a bare CalledProcessError says nothing)."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", free_port(), script, *argv],
                       cwd=os.path.dirname(script), env=env, capture_output=True, text=True,
                       timeout=timeout, **kw)
    assert r.returncode == 0, f"torchrun {script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def write_qwen3_base(path, std=0.02, seed=0, min_pixels=64 * 64, max_pixels=128 * 128, **cfg_kwargs):
    """A random tiny Qwen3-VL base for LIVR runs, as demo.make_demo_base makes the Qwen2.5-VL
    one: Qwen3-VL's tokenizer files (demo.build_tokenizer(family="qwen3"), small pixel limits so
    the synthetic images stay a few tokens) and a model written by checkpoint.save_pretrained, its
    special ids the tokenizer's and room for 64 latents. cfg_kwargs: config_dict3's shapes."""
    import math

    import checkpoint
    import data
    import demo
    import model
    demo.build_tokenizer(path, min_pixels=min_pixels, max_pixels=max_pixels, family="qwen3")
    proc = data.Processor.from_pretrained(path, num_latents=64)
    d = config_dict3(**cfg_kwargs)
    d["text_config"]["vocab_size"] = 64 * math.ceil(proc.vocab_size / 64)
    d["text_config"]["eos_token_id"] = proc.im_end_id
    d.update(image_token_id=proc.image_token_id, vision_start_token_id=proc.vision_start_token_id,
             vision_end_token_id=proc.vision_end_token_id,
             video_token_id=proc.tokenizer.token_to_id("<|video_pad|>"))
    m = model.Qwen25VL(checkpoint.config_from_dict(d))
    checkpoint.save_pretrained(model.init_weights(m, std=std, seed=seed), path)
    return str(path)


def cached_and_full_logits(m, ids, pv, thw, decode=4):
    """Logits of a prefill of all but `decode` tokens and then one cached decode step per token,
    next to one full forward's: the KV-cache path against the plain one (equal up to rounding)."""
    L, P = ids.shape[1], ids.shape[1] - decode
    with torch.no_grad():
        full = m(ids, pv, thw)
        pos = m.rope_index(ids, thw)
        m.setup_cache(1, L)
        step = [m(ids[:, :P], pv, thw, position_ids=pos[..., :P], input_pos=torch.arange(P),
                  mask=torch.ones(P, P, dtype=torch.bool).tril()[None])]
        for i in range(P, L):
            step.append(m(ids[:, i:i + 1], position_ids=pos[..., i:i + 1],
                          input_pos=torch.tensor([i]), mask=torch.ones(1, 1, i + 1, dtype=torch.bool)))
        m.clear_cache()
    return torch.cat(step, 1), full

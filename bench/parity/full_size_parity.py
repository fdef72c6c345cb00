"""Full-size parity on the GPU: a random-weight model of a published config
(e.g. Qwen3-0.6B), saved as safetensors, run by transformers and by
`pie --driver cuda` on the same weights.

Usage (GPU machine): python3 full_size_parity.py CONFIG.json PIE_BINARY DTYPE
DTYPE is float32 or bfloat16 (the checkpoint's dtype; transformers computes
in it, pie reads it). PIE_ARGS adds flags to pie's commands (e.g.
`--kv-cache-dtype bf16`) and PIE_LABEL a suffix to the output name.
Writes $OUT/full_size_parity_<model_type>_<dtype>[_<label>].json
with the max logit error relative to max|ref| over every prompt position,
and the greedy tokens of both over 32 steps.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

PROMPT_LEN, GEN = 24, 32


def pie_json(binary, args):
    env = dict(os.environ, LD_LIBRARY_PATH="/usr/local/cuda/lib64:" + os.environ.get("LD_LIBRARY_PATH", ""))
    extra = os.environ.get("PIE_ARGS", "").split()
    out = subprocess.run([binary, *args, *extra, "--driver", "cuda", "--json"], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout)


@torch.inference_mode()
def main():
    raw = json.load(open(sys.argv[1]))
    binary, dtype_name = sys.argv[2], sys.argv[3]
    dtype = getattr(torch, dtype_name)
    model_type = raw["model_type"]
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().eval()
    # Non-trivial norm weights, so a wrong norm cannot hide.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
    # No stop token: both sides generate all GEN tokens.
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, config.vocab_size, (1, PROMPT_LEN), generator=gen)
    ref_logits = model(ids.cuda(), use_cache=False).logits[0].float().cpu()
    ref_greedy = model.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), do_sample=False,
                                max_new_tokens=GEN, min_new_tokens=GEN, eos_token_id=None,
                                pad_token_id=0)[0, PROMPT_LEN:].tolist()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        id_arg = ",".join(str(i) for i in ids[0].tolist())
        logits = pie_json(binary, ["logits", "--model", d, "--ids", id_arg])["logits"]
        greedy = pie_json(binary, ["generate", "--model", d, "--ids", id_arg, "--max-tokens", str(GEN),
                                   "--temperature", "0"])
    got = torch.tensor(logits)
    scale = ref_logits.abs().max().item()
    err = (got - ref_logits).abs().max().item()
    tokens = greedy["ids"]
    agree = 0
    for a, b in zip(tokens, ref_greedy):
        if a != b:
            break
        agree += 1
    result = {
        "model_type": model_type,
        "dtype": dtype_name,
        "params": sum(p.numel() for p in model.parameters()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": PROMPT_LEN,
        "max_abs_logit_error": err,
        "max_abs_ref_logit": scale,
        "relative_error": err / scale,
        "greedy_pie": tokens,
        "greedy_transformers": ref_greedy,
        "greedy_agreeing_prefix": agree,
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("greedy_")}), "agree", agree, "/", GEN)
    out = os.environ.get("OUT", ".")
    label = f"_{os.environ['PIE_LABEL']}" if os.environ.get("PIE_LABEL") else ""
    result["pie_args"] = os.environ.get("PIE_ARGS", "")
    with open(os.path.join(out, f"full_size_parity_{model_type}_{dtype_name}{label}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

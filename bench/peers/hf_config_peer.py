"""Peer for `pie bench --config CONFIG` on architectures the torch+graph
peer does not cover (Gated DeltaNet, MoE): Hugging Face transformers
`generate` (eager, bf16, random weights of the config's shapes), prompt
128 + 128 greedy tokens.

Usage (on the GPU machine): python3 hf_config_peer.py CONFIG.json [BATCHES]
BATCHES defaults to 1,64. Writes $OUT/hf_peer_<model_type>.json.
transformers runs Gated DeltaNet with its own PyTorch fallback when
flash-linear-attention is not installed (it says so in its output).
"""

import json
import os
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


@torch.inference_mode()
def run(model, batch, prompt=128, new=128):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    raw = json.load(open(sys.argv[1]))
    model_type = raw["model_type"]
    batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,64").split(",")]
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "weight_GB": weight_bytes / 1e9, "rows": []}
    for batch in batches:
        dt = run(model, batch)
        row = {"mode": "hf eager", "bs": batch, "ms_per_step": dt / 128 * 1e3, "tok_s": batch * 128 / dt}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), f"hf_peer_{model_type}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()

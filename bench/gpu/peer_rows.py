"""Runs chosen (model, batch) rows of ../shared/bench/torch_graph_peer.py,
where its full plan would spend minutes on rows known to be weak (the
torch.compile peer's batched rows). COMPILE=1 as for the peer itself.

Usage: PEER_DIR=... [COMPILE=1] python3 peer_rows.py qwen3-0.6b:1 qwen3-8b:1
Writes $OUT/torch_compile_peer.json or $OUT/torch_graph_peer.json.
"""
import json
import os
import sys

sys.path.insert(0, os.environ["PEER_DIR"])
import torch  # noqa: E402
import torch_graph_peer as peer  # noqa: E402  (reads COMPILE at import)

rows = []
for spec in sys.argv[1:]:
    name, batch = spec.split(":")
    row = peer.run(name, int(batch))
    rows.append(row)
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
name = "torch_compile_peer.json" if peer.COMPILE else "torch_graph_peer.json"
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), name), "w"), indent=1)

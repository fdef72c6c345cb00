"""Streaming-read bandwidth of the GPU's memory, for the weight-read floor
(weight bytes ÷ this). Reads a 4 GiB bf16 buffer with a sum reduction and
copies it (read + write), 20 times each; prints and writes JSON to
$OUT/hbm_bandwidth.json."""
import json
import os

import torch

N = 2 * 1024**3  # bf16 elements: 4 GiB
x = torch.randn(N // 1024, 1024, device="cuda").to(torch.bfloat16)
y = torch.empty_like(x)
nbytes = x.numel() * x.element_size()


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


read_s = timed(lambda: x.sum(dtype=torch.float32))
copy_s = timed(lambda: y.copy_(x))
row = {
    "gpu": torch.cuda.get_device_name(),
    "buffer_gib": nbytes / 2**30,
    "read_tb_s": nbytes / read_s / 1e12,
    "copy_tb_s": 2 * nbytes / copy_s / 1e12,
}
print(json.dumps(row))
json.dump(row, open(os.path.join(os.environ.get("OUT", "/tmp"), "hbm_bandwidth.json"), "w"), indent=1)

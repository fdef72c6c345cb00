"""Registers and spills of the CUDA kernels, without a GPU: compiles
kernels/cuda/*.cu (in drivers/cuda/src/device.rs's order) with the NVRTC
that `pie build --flavor cuda13.0` downloaded, with `ptxas -v`.

Usage: python3 bench/gpu/kernel_registers.py [REGEX] [--arch sm_90] [--extra FILE]
(--extra: more source compiled after them, e.g. the specialized.cu that
`pie build --config` writes next to the kernels it compiled.)
Prints one line per kernel whose name matches REGEX: registers, and the
spill bytes when there are any.
"""
import argparse
import ctypes
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
NVRTC = pathlib.Path.home() / ".cache/pie/nvrtc/cuda13.0/nvidia/cu13/lib"


def kernel_source():
    """The translation unit the driver compiles (KERNEL_SOURCES order)."""
    device = (ROOT / "drivers/cuda/src/device.rs").read_text()
    table = device[device.index("pub const KERNEL_SOURCES"):device.index("];", device.index("KERNEL_SOURCES"))]
    files = re.findall(r'"(\w+\.cu)"', table)
    return "".join(f"// ---- {f}\n{(ROOT / 'kernels/cuda' / f).read_text()}\n" for f in files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("regex", nargs="?", default=".")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--extra", type=pathlib.Path)
    args = ap.parse_args()
    if not (NVRTC / "libnvrtc.so.13").exists():
        sys.exit(f"no NVRTC at {NVRTC}: run `pie build --arch qwen3 --flavor cuda13.0` once")
    ctypes.CDLL(str(NVRTC / "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(NVRTC / "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), (kernel_source() + (args.extra.read_text() if args.extra else "")).encode(), b"pie_kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={args.arch}".encode(), b"-Xptxas=-v"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode()
    if rc:
        sys.exit(text)
    name = None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif name and re.search(args.regex, name):
            if m := re.search(r"Used (\d+) registers", line):
                print(f"{name:45s} {m.group(1)} registers")
            elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                if m.group(1) != "0" or m.group(2) != "0":
                    print(f"{name:45s} spills: {m.group(0)}")


if __name__ == "__main__":
    main()

//! Embeds ahead-of-time kernel images when `pie build` provides them:
//! `PIE_CUDA_KERNELS` names a directory with `sm_80.cubin`, `sm_89.cubin`,
//! `sm_90.cubin` and `compute_80.ptx`. Without it the driver compiles its
//! kernels with NVRTC when it starts.

use std::path::PathBuf;

const FILES: [&str; 4] = [
    "sm_80.cubin",
    "sm_89.cubin",
    "sm_90.cubin",
    "compute_80.ptx",
];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(pie_embedded_kernels)");
    println!("cargo:rerun-if-env-changed=PIE_CUDA_KERNELS");
    let Some(dir) = std::env::var_os("PIE_CUDA_KERNELS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for file in FILES {
        let src = dir.join(file);
        println!("cargo:rerun-if-changed={}", src.display());
        if let Err(e) = std::fs::copy(&src, out.join(file)) {
            panic!(
                "PIE_CUDA_KERNELS={}: cannot read {file}: {e} (run `pie build`, which compiles them)",
                dir.display()
            );
        }
    }
    println!("cargo:rustc-cfg=pie_embedded_kernels");
}

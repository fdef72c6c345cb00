//! Embeds ahead-of-time kernel images when `pie build` provides them:
//! `PIE_CUDA_KERNELS` names a directory with `sm_80.cubin`, `sm_89.cubin`,
//! `sm_90.cubin` and `compute_80.ptx`, and optionally `specialized.txt`
//! (the model-specialized entry points in them, one per line). Without it
//! the driver compiles its generic kernels with NVRTC when it starts.

use std::path::PathBuf;

const FILES: [&str; 4] = [
    "sm_80.cubin",
    "sm_89.cubin",
    "sm_90.cubin",
    "compute_80.ptx",
];

/// The specialized entry points' list (`pie build --config`; absent or
/// empty: none), embedded as `SPECIALIZED`; the name
/// `kernel_build::SPECIALIZED_LIST` writes (a build script cannot use the
/// crate it builds).
const SPECIALIZED_LIST: &str = "specialized.txt";

fn main() {
    println!("cargo:rustc-check-cfg=cfg(pie_embedded_kernels)");
    println!("cargo:rerun-if-env-changed=PIE_CUDA_KERNELS");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = std::env::var_os("PIE_CUDA_KERNELS").map(PathBuf::from);
    let names: Vec<String> = match &dir {
        Some(dir) => {
            let list = dir.join(SPECIALIZED_LIST);
            println!("cargo:rerun-if-changed={}", list.display());
            std::fs::read_to_string(&list)
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        }
        None => Vec::new(),
    };
    let listed: String = names.iter().map(|n| format!("    {n:?},\n")).collect();
    std::fs::write(
        out.join("specialized.rs"),
        format!("pub const SPECIALIZED: &[&str] = &[\n{listed}];\n"),
    )
    .expect("OUT_DIR is writable");
    let Some(dir) = dir else {
        return;
    };
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

//! `pie build --arch ARCH --flavor FLAVOR`: a serving binary holding one
//! architecture's generated code and one flavor's driver — `portable` (CPU
//! only), `cuda12.8` or `cuda13.0` (the CUDA driver against that API, its
//! kernels compiled ahead of time by NVRTC into cubins for sm_80/sm_89/sm_90
//! plus PTX and embedded, so the binary needs no CUDA toolkit to run).
//!
//! It compiles Pie's own source tree with cargo (`--source`, by default the
//! tree this `pie` was built from), so it needs a Rust toolchain; NVRTC
//! comes from NVIDIA's PyPI wheel, fetched once with pip into the cache.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pie_codegen::cuda_kernels::{specialized_kernels, SpecializedKernels};
use pie_driver_portable::PortableDriver;
use pie_runtime::{catalog, registry};

#[derive(Args)]
pub struct BuildArgs {
    /// Architecture (a spec name, as `pie spec list` shows).
    #[arg(long)]
    arch: String,
    /// `portable`, `cuda12.8` or `cuda13.0`.
    #[arg(long, value_parser = ["portable", "cuda12.8", "cuda13.0"])]
    flavor: String,
    /// Where the binary goes (as `pie-ARCH-FLAVOR`).
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Pie's source tree (default: the one this `pie` was built from).
    #[arg(long)]
    source: Option<PathBuf>,
    /// A model's `config.json` (or its directory) whose shapes the CUDA
    /// kernels are specialized for (its GEMV widths and MLP activation baked
    /// in); repeatable. Other models of the architecture still run, on the
    /// generic kernels.
    #[arg(long = "config", value_name = "CONFIG")]
    configs: Vec<PathBuf>,
}

/// A CUDA flavor: its cargo feature and where its NVRTC comes from.
struct CudaFlavor {
    feature: &'static str,
    wheel: &'static str,
    /// The NVRTC library inside the wheel.
    library: &'static str,
}

fn cuda_flavor(name: &str) -> Option<CudaFlavor> {
    match name {
        "cuda12.8" => Some(CudaFlavor {
            feature: "cuda12_8",
            wheel: "nvidia-cuda-nvrtc-cu12==12.8.*",
            library: "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        }),
        "cuda13.0" => Some(CudaFlavor {
            feature: "cuda13_0",
            wheel: "nvidia-cuda-nvrtc==13.0.*",
            library: "nvidia/cu13/lib/libnvrtc.so.13",
        }),
        _ => None,
    }
}

pub fn build(args: BuildArgs) -> Result<(), String> {
    let started = Instant::now();
    let known: Vec<&str> = registry::architectures::<PortableDriver>()
        .iter()
        .map(|a| a.name)
        .collect();
    if !known.contains(&args.arch.as_str()) {
        return Err(format!(
            "unknown architecture `{}` (known: {})",
            args.arch,
            known.join(", ")
        ));
    }
    let source = source_tree(args.source.as_deref())?;
    let flavor = cuda_flavor(&args.flavor);
    if flavor.is_none() && !args.configs.is_empty() {
        return Err(format!(
            "--config specializes CUDA kernels; flavor `{}` has none (use cuda12.8 or cuda13.0)",
            args.flavor
        ));
    }
    let specialized = specialize(&args.arch, &args.configs)?;
    let spinner = spinner();
    let mut features = vec![format!("arch-{}", args.arch)];
    let mut env: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(flavor) = flavor {
        let nvrtc = fetch_nvrtc(&args.flavor, &flavor, &spinner)?;
        let kernels = catalog::cache_dir().join("kernels").join(&args.flavor);
        compile_kernels(&nvrtc, &kernels, &specialized, &spinner)?;
        features.push(flavor.feature.to_string());
        env.push(("PIE_CUDA_KERNELS", kernels));
    }
    let target_dir = source.join("target").join("pie-build");
    let binary = cargo_build(&source, &target_dir, &features, &env, &spinner)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let dest = args.out.join(format!("pie-{}-{}", args.arch, args.flavor));
    std::fs::copy(&binary, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    spinner.finish_and_clear();
    let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    println!(
        "built {} ({:.1} MB) in {:.0} s: architecture `{}`, {} driver{}",
        dest.display(),
        size as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        args.arch,
        if args.flavor == "portable" {
            "portable CPU"
        } else {
            "portable CPU + CUDA"
        },
        if args.flavor == "portable" {
            String::new()
        } else {
            format!(
                " (kernels: sm_80, sm_89, sm_90 cubins + compute_80 PTX; {})",
                match specialized.names.len() {
                    0 => "generic only: --config bakes a model's shapes in".to_string(),
                    n => format!("{n} specialized for {} config(s)", args.configs.len()),
                }
            )
        }
    );
    Ok(())
}

/// The CUDA kernels codegen specializes for `configs` (each a
/// `config.json` or a directory holding one), lowered with `arch`'s spec.
fn specialize(arch: &str, configs: &[PathBuf]) -> Result<SpecializedKernels, String> {
    let spec_of = registry::find_by_name::<PortableDriver>(arch)
        .ok_or_else(|| format!("unknown architecture `{arch}`"))?;
    let spec = pie_archspec::parse(spec_of.spec_path, spec_of.spec_text)
        .map_err(|d| format!("{}: {d}", spec_of.spec_path))?;
    let mut models = Vec::new();
    for given in configs {
        let path = if given.is_dir() {
            given.join("config.json")
        } else {
            given.clone()
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("--config {shown}: {e}"))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("--config {shown}: not JSON: {e}"))?;
        let model = pie_archspec::lower(&spec, &config, &shown)
            .map_err(|e| format!("--config {shown} does not fit architecture `{arch}`: {e}"))?;
        models.push(model);
    }
    let refs: Vec<&pie_archspec::ir::Model> = models.iter().collect();
    Ok(specialized_kernels(&refs))
}

fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// The source tree to compile: given, or the one this binary came from.
fn source_tree(given: Option<&Path>) -> Result<PathBuf, String> {
    let root = match given {
        Some(p) => p.to_path_buf(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    if !root.join("Cargo.toml").exists() || !root.join("specs").is_dir() {
        return Err(format!(
            "{}: not Pie's source tree (no Cargo.toml and specs/); pass --source DIR",
            root.display()
        ));
    }
    Ok(root)
}

/// NVRTC for a flavor, from its wheel in the cache (fetched once).
fn fetch_nvrtc(name: &str, flavor: &CudaFlavor, bar: &ProgressBar) -> Result<PathBuf, String> {
    let dir = catalog::cache_dir().join("nvrtc").join(name);
    let lib = dir.join(flavor.library);
    if lib.exists() {
        return Ok(lib);
    }
    bar.set_message(format!("downloading NVRTC ({}) with pip…", flavor.wheel));
    let work = dir.join(".download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let wheel = catalog::pip_download(flavor.wheel, &work).map_err(|e| {
        format!("{e}\nNVRTC is needed to compile the CUDA kernels: `python3 -m pip download {}` must work here", flavor.wheel)
    })?;
    bar.set_message("extracting NVRTC…");
    let lib_dir = Path::new(flavor.library)
        .parent()
        .expect("library has a directory");
    for member in wheel_members(&wheel, lib_dir)? {
        catalog::extract_member(&wheel, &member, &dir).map_err(|e| e.to_string())?;
    }
    let _ = std::fs::remove_dir_all(&work);
    if !lib.exists() {
        return Err(format!(
            "{}: the wheel has no {}",
            wheel.display(),
            flavor.library
        ));
    }
    Ok(lib)
}

/// The wheel's files under `dir` (NVRTC and its builtins library).
fn wheel_members(wheel: &Path, dir: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; print('\\n'.join(zipfile.ZipFile(sys.argv[1]).namelist()))",
        ])
        .arg(wheel)
        .output()
        .map_err(|e| format!("cannot run python3 to read the wheel: {e}"))?;
    let prefix = format!("{}/", dir.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(".so"))
        .map(str::to_string)
        .collect())
}

#[cfg(feature = "cuda")]
fn compile_kernels(
    nvrtc: &Path,
    out: &Path,
    specialized: &SpecializedKernels,
    bar: &ProgressBar,
) -> Result<(), String> {
    let (source, names) = (&specialized.source, &specialized.names);
    pie_driver_cuda::kernel_build::compile_kernels(nvrtc, out, source, names, &|arch| {
        bar.set_message(format!("compiling the CUDA kernels with NVRTC for {arch}…"))
    })
    .map(|_| ())
}

#[cfg(not(feature = "cuda"))]
fn compile_kernels(
    _nvrtc: &Path,
    _out: &Path,
    _specialized: &SpecializedKernels,
    _bar: &ProgressBar,
) -> Result<(), String> {
    Err("this pie was built without the CUDA driver, so it cannot build CUDA flavors".into())
}

/// `cargo build --release -p pie` with only the given features; shows
/// cargo's progress lines on the spinner; returns the binary.
fn cargo_build(
    source: &Path,
    target_dir: &Path,
    features: &[String],
    env: &[(&str, PathBuf)],
    bar: &ProgressBar,
) -> Result<PathBuf, String> {
    bar.set_message(format!("cargo build (features {})…", features.join(",")));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(source)
        .args([
            "build",
            "--release",
            "-p",
            "pie",
            "--no-default-features",
            "--features",
        ])
        .arg(features.join(","))
        .env("CARGO_TARGET_DIR", target_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e} (pie build needs a Rust toolchain)"))?;
    let mut log = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let shown = line.trim();
            if shown.starts_with("Compiling") || shown.starts_with("Finished") {
                bar.set_message(shown.to_string());
            }
            log.push(line);
        }
    }
    let status = child.wait().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        let tail: Vec<&String> = log.iter().rev().take(30).collect();
        return Err(format!(
            "cargo build failed:\n{}",
            tail.into_iter()
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    Ok(target_dir.join("release").join("pie"))
}

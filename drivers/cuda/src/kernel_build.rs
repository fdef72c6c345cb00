//! Ahead-of-time kernel compilation for `pie build`: NVRTC (loaded from a
//! given file, e.g. the `nvidia-cuda-nvrtc` wheel's `libnvrtc.so.12`; no GPU
//! needed) turns the kernel sources into cubins for each target GPU
//! architecture plus PTX for newer ones, which the driver build embeds.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use libloading::{Library, Symbol};

/// GPU architectures built as cubins; `compute_80` PTX covers newer GPUs
/// (the driver JIT-compiles it).
pub const CUBIN_ARCHS: [&str; 3] = ["sm_80", "sm_89", "sm_90"];
pub const PTX_ARCH: &str = "compute_80";

/// The kernel sources as one translation unit.
pub fn kernel_source() -> String {
    crate::device::kernel_source()
}

type Prog = *mut c_void;

struct Nvrtc {
    lib: Library,
    /// `libnvrtc-builtins`, loaded first by path: NVRTC opens it by name,
    /// which finds the already-loaded copy whatever the library path.
    _builtins: Vec<libloading::os::unix::Library>,
}

impl Nvrtc {
    fn open(path: &Path) -> Result<Self, String> {
        let mut builtins = Vec::new();
        if let Some(dir) = path.parent() {
            for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
                let file = entry.map_err(|e| e.to_string())?.path();
                let name = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if name.starts_with("libnvrtc-builtins.so") {
                    // SAFETY: as for NVRTC itself below.
                    let lib = unsafe {
                        libloading::os::unix::Library::open(
                            Some(&file),
                            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                        )
                    }
                    .map_err(|e| format!("cannot load {}: {e}", file.display()))?;
                    builtins.push(lib);
                }
            }
        }
        // SAFETY: loading NVRTC runs its initializers, which have no
        // preconditions.
        let lib = unsafe { Library::new(path) }
            .map_err(|e| format!("cannot load NVRTC from {}: {e}", path.display()))?;
        Ok(Nvrtc {
            lib,
            _builtins: builtins,
        })
    }

    fn sym<T>(&self, name: &[u8]) -> Result<Symbol<'_, T>, String> {
        // SAFETY: each symbol is looked up with its documented C signature.
        unsafe { self.lib.get(name) }.map_err(|e| {
            format!(
                "NVRTC lacks {}: {e}",
                String::from_utf8_lossy(&name[..name.len() - 1])
            )
        })
    }

    /// Compiles `source` for `arch` (`sm_90` → cubin, `compute_80` → PTX).
    fn compile(&self, source: &str, arch: &str) -> Result<Vec<u8>, String> {
        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type Compile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
        type Get = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut Prog) -> c_int;
        let create: Symbol<Create> = self.sym(b"nvrtcCreateProgram\0")?;
        let compile: Symbol<Compile> = self.sym(b"nvrtcCompileProgram\0")?;
        let log_size: Symbol<Size> = self.sym(b"nvrtcGetProgramLogSize\0")?;
        let log: Symbol<Get> = self.sym(b"nvrtcGetProgramLog\0")?;
        let destroy: Symbol<Destroy> = self.sym(b"nvrtcDestroyProgram\0")?;
        let (out_size, out): (Symbol<Size>, Symbol<Get>) = if arch.starts_with("sm_") {
            (
                self.sym(b"nvrtcGetCUBINSize\0")?,
                self.sym(b"nvrtcGetCUBIN\0")?,
            )
        } else {
            (self.sym(b"nvrtcGetPTXSize\0")?, self.sym(b"nvrtcGetPTX\0")?)
        };
        let src = CString::new(source).map_err(|_| "kernel source contains a NUL byte")?;
        let name = CString::new("pie_kernels.cu").expect("no NUL");
        let opt = CString::new(format!("--gpu-architecture={arch}")).expect("no NUL");
        let opts = [opt.as_ptr()];
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: the pointers are valid C strings for the calls' duration;
        // `prog` is destroyed below on every path.
        unsafe {
            let rc = create(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed ({rc})"));
            }
            let rc = compile(prog, 1, opts.as_ptr());
            let result = if rc != 0 {
                let mut n = 0usize;
                log_size(prog, &mut n);
                let mut buf = vec![0u8; n.max(1)];
                log(prog, buf.as_mut_ptr() as *mut c_char);
                let text = CStr::from_bytes_until_nul(&buf)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(format!(
                    "NVRTC could not compile the kernels for {arch}:\n{text}"
                ))
            } else {
                let mut n = 0usize;
                out_size(prog, &mut n);
                let mut buf = vec![0u8; n];
                out(prog, buf.as_mut_ptr() as *mut c_char);
                if !arch.starts_with("sm_") {
                    // PTX is text; keep it without its trailing NUL.
                    while buf.last() == Some(&0) {
                        buf.pop();
                    }
                }
                Ok(buf)
            };
            destroy(&mut prog);
            result
        }
    }
}

/// The file listing the specialized entry points (one name per line) that
/// `build.rs` embeds with the images.
pub const SPECIALIZED_LIST: &str = "specialized.txt";
/// The generated source of those entry points, kept for reading.
pub const SPECIALIZED_SOURCE: &str = "specialized.cu";

/// Compiles the kernels with the NVRTC library at `nvrtc` into `out_dir`
/// (`sm_80.cubin`, `sm_89.cubin`, `sm_90.cubin`, `compute_80.ptx`),
/// calling `step` before each target. `specialized` is generated source
/// compiled after the generic kernels (codegen's model-specialized entry
/// points, named in `names`; empty for none): its list and source go to
/// [`SPECIALIZED_LIST`] and [`SPECIALIZED_SOURCE`].
pub fn compile_kernels(
    nvrtc: &Path,
    out_dir: &Path,
    specialized: &str,
    names: &[String],
    step: &dyn Fn(&str),
) -> Result<Vec<PathBuf>, String> {
    let nvrtc = Nvrtc::open(nvrtc)?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let source = format!(
        "{}\n// ---- specialized (codegen)\n{specialized}",
        kernel_source()
    );
    let mut written = Vec::new();
    for arch in CUBIN_ARCHS.iter().chain([&PTX_ARCH]) {
        step(arch);
        let image = nvrtc.compile(&source, arch)?;
        let file = out_dir.join(if arch.starts_with("sm_") {
            format!("{arch}.cubin")
        } else {
            format!("{arch}.ptx")
        });
        std::fs::write(&file, image).map_err(|e| format!("{}: {e}", file.display()))?;
        written.push(file);
    }
    for (file, text) in [
        (SPECIALIZED_LIST, names.join("\n")),
        (SPECIALIZED_SOURCE, specialized.to_string()),
    ] {
        let path = out_dir.join(file);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

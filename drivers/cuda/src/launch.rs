//! Kernel launches that may overlap their predecessor (programmatic
//! dependent launch, Hopper and later). A decode step at batch 1 is a few
//! hundred kernels of a few µs each, most of that time waiting on memory.
//! Launched with the programmatic-serialization attribute, a kernel's
//! blocks start while the kernel before still runs and do what needs none
//! of its outputs — a GEMV loads its weights, attention its cache slots —
//! then wait for it in `pie_pdl_wait` (`kernels/cuda/pdl.cu`). Only the
//! kernels [`overlaps`] names get the attribute (each reaches
//! `pie_pdl_wait` before it reads another kernel's output or writes
//! anything; a test checks that each calls a helper that waits), and only
//! when the loaded image was compiled with the waits (`pie_pdl_probe`).

use std::ffi::c_void;

use cudarc::driver::{sys, CudaSlice, DeviceRepr, LaunchConfig};
use pie_driver::{DriverError, Result};

use crate::{cuda_err, graphs, CudaDriver};

/// Kernel families launched with the attribute (names starting so): the
/// decode GEMVs, grouped attention's partial and folded passes; each
/// kernel of them calls a helper that waits (`pie_pdl_wait`) after loading
/// what the kernel before does not write, which a test checks.
const PDL_FAMILIES: [&str; 3] = [
    "pie_gemv",
    "pie_gqa_attention_partial",
    "pie_gqa_attention_fold",
];

/// Single kernels launched with the attribute: the q/k norm + rope, the
/// one-launch MLP halves, and greedy sampling's two passes (which wait
/// before they read anything but their row indices).
const PDL_KERNELS: [&str; 5] = [
    "pie_rms_norm_rope2",
    "pie_mlp_fold_bf16_m1",
    "pie_mlp_fold_t_bf16_m1",
    "pie_greedy_partial",
    "pie_greedy_finish",
];

/// Whether kernel `name` is launched to overlap its predecessor: the
/// [`PDL_FAMILIES`] and [`PDL_KERNELS`].
pub(crate) fn overlaps(name: &str) -> bool {
    PDL_KERNELS.contains(&name) || PDL_FAMILIES.iter().any(|f| name.starts_with(f))
}

/// Device pointers a launch holds by value (kernel parameters point at
/// them; boxed, so they stay put as the builder moves).
const MAX_POINTERS: usize = 24;

/// One kernel launch being assembled: `arg` for values (scalars, device
/// addresses as `u64`), `buf` for device buffers.
pub(crate) struct Launch<'a> {
    driver: &'a CudaDriver,
    name: &'static str,
    params: Vec<*mut c_void>,
    pointers: Box<[u64; MAX_POINTERS]>,
    held: usize,
}

impl CudaDriver {
    /// A launch of kernel `name`.
    pub(crate) fn launch(&self, name: &'static str) -> Launch<'_> {
        Launch {
            driver: self,
            name,
            params: Vec::with_capacity(24),
            pointers: Box::new([0; MAX_POINTERS]),
            held: 0,
        }
    }
}

impl<'a> Launch<'a> {
    /// A value parameter (the kernel reads it when the launch is made).
    pub fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.params.push(value as *const T as *mut c_void);
        self
    }

    /// A device buffer parameter (its address).
    pub fn buf<T>(&mut self, buffer: &'a CudaSlice<T>) -> &mut Self {
        assert!(
            self.held < MAX_POINTERS,
            "more than {MAX_POINTERS} buffers in one launch"
        );
        self.pointers[self.held] = graphs::address(buffer);
        let slot = &self.pointers[self.held] as *const u64 as *mut c_void;
        self.held += 1;
        self.params.push(slot);
        self
    }

    /// Launches on the driver's stream, overlapping the previous kernel
    /// where this kernel and the loaded image allow it.
    ///
    /// # Safety
    /// The parameters must match the kernel's signature, and the buffers
    /// must hold what the kernel indexes.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        let d = self.driver;
        let func = d.kernels.get(self.name).cu_function();
        let overlap = d.pdl && overlaps(self.name);
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: d.stream.cu_stream(),
            attrs: if overlap {
                &mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(overlap),
        };
        let status = sys::cuLaunchKernelEx(
            &config,
            func,
            self.params.as_mut_ptr(),
            std::ptr::null_mut(),
        );
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda_err(self.name)(cudarc::driver::DriverError(status)));
        }
        Ok(())
    }
}

/// Whether the loaded kernels carry the waits of `pdl.cu` (an image
/// for compute capability 9.0 or later).
pub(crate) fn image_has_pdl(d: &CudaDriver) -> Result<bool> {
    let mut flag = d
        .stream
        .alloc_zeros::<i32>(1)
        .map_err(cuda_err("allocating the launch probe"))?;
    let mut b = d.stream.launch_builder(d.kernels.get("pie_pdl_probe"));
    use cudarc::driver::PushKernelArg;
    b.arg(&mut flag);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(one) }.map_err(cuda_err("pie_pdl_probe"))?;
    let host = d
        .stream
        .clone_dtoh(&flag)
        .map_err(cuda_err("reading the launch probe"))?;
    match host.first() {
        Some(&v) => Ok(v == 1),
        None => Err(DriverError::Invalid(
            "CUDA: the launch probe returned nothing".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    /// The device functions through which the overlapping kernels wait: each calls
    /// `pie_pdl_wait()` or a helper before it in this list.
    const WAITING_HELPERS: [&str; 10] = [
        "pie_gemv_block_t",
        "pie_gemv_block",
        "pie_gemv3",
        "pie_gemv_entry",
        "pie_gemv_add_entry",
        "pie_gemv3_norm_entry",
        "pie_gemv_glu_entry",
        "pie_gemv_glu_norm_entry",
        "pie_norm_rope_head",
        "pie_gqa_partial",
    ];

    /// The text of the function, or macro, defining `name`: from its name
    /// to the end of its body (the next line starting with `}`, or, for a
    /// macro, the first line not continued by a backslash).
    fn definition<'s>(source: &'s str, name: &str) -> &'s str {
        let at = source
            .match_indices(name)
            .map(|(at, _)| at)
            .find(|&at| {
                let rest = &source[at + name.len()..];
                let named = source[..at].ends_with([' ', '\n', '*'])
                    && (rest.starts_with('(') || rest.starts_with(" ("));
                named && rest.find('{') < rest.find(';')
            })
            .unwrap_or_else(|| panic!("`{name}` has no definition in the sources"));
        let end = source[at..].find("\n}").map_or(source.len(), |e| at + e);
        &source[at..end]
    }

    /// Every kernel launched with the attribute calls a helper that waits
    /// (directly, or through the macro that defines it): a kernel that did
    /// not could read its predecessor's outputs before they are written.
    /// (Where in the helper the wait sits is the helper's comment's word.)
    #[test]
    fn every_overlapping_kernel_waits_for_its_predecessor() {
        let source = crate::device::kernel_source();
        for (i, helper) in WAITING_HELPERS.iter().enumerate() {
            let body = definition(&source, helper);
            let waits = body.contains("pie_pdl_wait();")
                || WAITING_HELPERS[..i]
                    .iter()
                    .any(|h| body.contains(&format!("{h}<")) || body.contains(&format!("{h}(")));
            assert!(waits, "`{helper}` reaches no pie_pdl_wait()");
        }
        let listed = crate::device::KERNELS.iter().filter(|n| overlaps(n));
        let mut checked = 0;
        for name in listed {
            checked += 1;
            let body = match source.find(&format!("({name},")) {
                // A macro instance `MACRO(name, ...)`: check the macro.
                Some(at) => {
                    let start = source[..at].rfind('\n').map_or(0, |i| i + 1);
                    let macro_name = &source[start..at];
                    let def = source
                        .find(&format!("#define {macro_name}("))
                        .unwrap_or_else(|| panic!("macro `{macro_name}` of `{name}` not found"));
                    let end = source[def..]
                        .find(")\n\n")
                        .map_or(source.len(), |e| def + e);
                    &source[def..end]
                }
                None => definition(&source, name),
            };
            let calls_helper = body.contains("pie_pdl_wait();")
                || WAITING_HELPERS.iter().any(|h| body.contains(h));
            assert!(calls_helper, "`{name}` reaches no pie_pdl_wait(): {body}");
        }
        assert!(checked > 0, "no kernel of KERNELS is launched to overlap");
    }

    /// The same for the entry points codegen specializes for a model
    /// (Qwen3-0.6B's shapes here): each overlaps, so each must wait.
    #[test]
    fn specialized_kernels_wait_for_their_predecessor() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        let spec = pie_archspec::parse("specs/qwen3.toml", &read("specs/qwen3.toml")).unwrap();
        let config = serde_json::from_str(&read("tests/configs/qwen3.json")).unwrap();
        let model = pie_archspec::lower(&spec, &config, "config.json").unwrap();
        let generated = pie_codegen::cuda_kernels::specialized_kernels(&[&model]);
        assert!(!generated.names.is_empty());
        for name in &generated.names {
            assert!(overlaps(name), "`{name}` would not overlap");
            let at = generated.source.find(&format!("\n{name}(")).unwrap();
            let end = generated.source[at..].find("\n}").unwrap();
            let body = &generated.source[at..at + end];
            assert!(
                WAITING_HELPERS
                    .iter()
                    .any(|h| body.contains(&format!("{h}<"))),
                "`{name}` reaches no pie_pdl_wait(): {body}"
            );
        }
    }
}

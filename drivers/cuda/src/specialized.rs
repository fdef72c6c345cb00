//! Which GEMV entry point a launch takes: the one `pie build --config`
//! specialized for this input width (and activation) when the embedded
//! image holds it, else the generic kernel. Names come from codegen's
//! scheme (`pie_codegen::cuda_kernels`), the one that generated them.

use pie_codegen::cuda_kernels::{gemv_kernel_name, glu_kernel_name};
use pie_driver::ir::ActivationFn;

use crate::CudaDriver;

impl CudaDriver {
    /// `generic` (a GEMV of `gemv.cu`), or its form with `k` baked in.
    pub(crate) fn gemv_kernel(&self, generic: &'static str, k: usize) -> &'static str {
        self.specialized_or(generic, || gemv_kernel_name(generic, k))
    }

    /// `generic` (a GLU GEMV of `fused.cu`), or its form with `k` and the
    /// activation baked in. Clamped GLUs (`limit`) have no such form.
    pub(crate) fn glu_kernel(
        &self,
        generic: &'static str,
        k: usize,
        act: ActivationFn,
        limit: Option<f32>,
    ) -> &'static str {
        if limit.is_some() {
            return generic;
        }
        self.specialized_or(generic, || glu_kernel_name(generic, k, act))
    }

    fn specialized_or(&self, generic: &'static str, name: impl FnOnce() -> String) -> &'static str {
        if !self.specialized {
            return generic;
        }
        self.kernels.find(&name()).unwrap_or(generic)
    }
}

//! Which GEMV entry point a launch takes: the one `pie build --config`
//! specialized for this input width (and activation) when the embedded
//! image holds it, else the generic kernel; each in its single-row form
//! (`_m1`) for one row. Names come from codegen's scheme
//! (`pie_codegen::cuda_kernels`), the one that generated them.

use pie_codegen::cuda_kernels::{gemv_kernel_name, glu_kernel_name};
use pie_driver::ir::ActivationFn;

use crate::CudaDriver;

impl CudaDriver {
    /// The entry point of GEMV `generic` (of `gemv.cu`) for `rows` rows of
    /// width `k`: baked for `k` where the image has it, and for one row
    /// (`_m1`) when `rows` is 1.
    pub(crate) fn gemv_kernel(&self, generic: &'static str, k: usize, rows: usize) -> &'static str {
        self.pick(
            generic,
            rows,
            Some(&|single| gemv_kernel_name(generic, k, single)),
        )
    }

    /// The same for GLU GEMV `generic` (of `fused.cu`) with activation
    /// `act`; clamped GLUs (`limit`) have no specialized forms.
    pub(crate) fn glu_kernel(
        &self,
        generic: &'static str,
        k: usize,
        rows: usize,
        act: ActivationFn,
        limit: Option<f32>,
    ) -> &'static str {
        let baked = |single| glu_kernel_name(generic, k, act, single);
        self.pick(generic, rows, limit.is_none().then_some(&baked))
    }

    /// The first loaded of: the specialized single-row form, the
    /// specialized form, the generic single-row form, the generic kernel.
    fn pick(
        &self,
        generic: &'static str,
        rows: usize,
        specialized: Option<&dyn Fn(bool) -> String>,
    ) -> &'static str {
        if !self.specialized {
            return generic;
        }
        let single = rows == 1;
        let mut names = Vec::with_capacity(3);
        if let Some(baked) = specialized {
            if single {
                names.push(baked(true));
            }
            names.push(baked(false));
        }
        if single {
            names.push(format!("{generic}_m1"));
        }
        names
            .iter()
            .find_map(|n| self.kernels.find(n))
            .unwrap_or(generic)
    }
}

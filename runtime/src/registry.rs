//! Every architecture compiled into this binary. Each `arch!` expands a spec
//! into its generated module at compile time; `pie build --arch` narrows
//! this list to one.

use pie_driver::loader::WeightStore;
use pie_driver::{ir, Driver, ModelForward, Result};

/// A compiled-in architecture.
pub struct Arch<D: Driver> {
    pub name: &'static str,
    pub hf_model_types: &'static [&'static str],
    pub spec_path: &'static str,
    pub spec_text: &'static str,
    pub load: LoadFn<D>,
}

pub type LoadFn<D> = fn(&mut WeightStore<'_, D>, &ir::Model) -> Result<Box<dyn ModelForward<D>>>;

// Each architecture is compiled in with the `all-archs` feature (the
// default) or its own `arch-<name>` feature (`pie build --arch <name>`).
macro_rules! architectures {
    ($($name:ident => $path:literal, $feature:literal),* $(,)?) => {
        pub mod generated {
            $(
                #[cfg(any(feature = "all-archs", feature = $feature))]
                pie_macros::arch!($path);
            )*
        }

        /// All compiled-in architectures.
        #[allow(clippy::vec_init_then_push)]
        pub fn architectures<D: Driver + 'static>() -> Vec<Arch<D>> {
            let mut list = Vec::new();
            $(
                #[cfg(any(feature = "all-archs", feature = $feature))]
                list.push(Arch {
                    name: generated::$name::NAME,
                    hf_model_types: generated::$name::HF_MODEL_TYPES,
                    spec_path: generated::$name::SPEC_PATH,
                    spec_text: generated::$name::SPEC_TEXT,
                    load: |store, model| Ok(Box::new(generated::$name::Model::load(store, model)?)),
                });
            )*
            list
        }
    };
}

architectures! {
    llama => "../specs/llama.toml", "arch-llama",
    mistral => "../specs/mistral.toml", "arch-mistral",
    qwen2 => "../specs/qwen2.toml", "arch-qwen2",
    qwen3 => "../specs/qwen3.toml", "arch-qwen3",
    gemma2 => "../specs/gemma2.toml", "arch-gemma2",
    gemma3 => "../specs/gemma3.toml", "arch-gemma3",
    gemma3n => "../specs/gemma3n.toml", "arch-gemma3n",
    olmo2 => "../specs/olmo2.toml", "arch-olmo2",
    phi3 => "../specs/phi3.toml", "arch-phi3",
    mistral3 => "../specs/mistral3.toml", "arch-mistral3",
    mixtral => "../specs/mixtral.toml", "arch-mixtral",
    phimoe => "../specs/phimoe.toml", "arch-phimoe",
    gpt_oss => "../specs/gpt_oss.toml", "arch-gpt_oss",
    qwen3_moe => "../specs/qwen3_moe.toml", "arch-qwen3_moe",
    qwen3_5 => "../specs/qwen3_5.toml", "arch-qwen3_5",
    qwen3_next => "../specs/qwen3_next.toml", "arch-qwen3_next",
    deepseek_v2 => "../specs/deepseek_v2.toml", "arch-deepseek_v2",
    deepseek_v3 => "../specs/deepseek_v3.toml", "arch-deepseek_v3",
    glm_moe_dsa => "../specs/glm_moe_dsa.toml", "arch-glm_moe_dsa",
    nemotron_h => "../specs/nemotron_h.toml", "arch-nemotron_h",
}

/// The architecture serving a config's `model_type`.
pub fn find_by_model_type<D: Driver + 'static>(model_type: &str) -> Option<Arch<D>> {
    architectures::<D>()
        .into_iter()
        .find(|a| a.hf_model_types.contains(&model_type))
}

/// The architecture called `name` (a spec name such as `qwen3`).
pub fn find_by_name<D: Driver + 'static>(name: &str) -> Option<Arch<D>> {
    architectures::<D>().into_iter().find(|a| a.name == name)
}

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

macro_rules! architectures {
    ($($name:ident => $path:literal),* $(,)?) => {
        pub mod generated {
            $( pie_macros::arch!($path); )*
        }

        /// All compiled-in architectures, in spec-name order.
        pub fn architectures<D: Driver + 'static>() -> Vec<Arch<D>> {
            vec![$(
                Arch {
                    name: generated::$name::NAME,
                    hf_model_types: generated::$name::HF_MODEL_TYPES,
                    spec_path: generated::$name::SPEC_PATH,
                    spec_text: generated::$name::SPEC_TEXT,
                    load: |store, model| Ok(Box::new(generated::$name::Model::load(store, model)?)),
                },
            )*]
        }
    };
}

architectures! {
    llama => "../specs/llama.toml",
    mistral => "../specs/mistral.toml",
    qwen2 => "../specs/qwen2.toml",
    qwen3 => "../specs/qwen3.toml",
    gemma2 => "../specs/gemma2.toml",
    gemma3 => "../specs/gemma3.toml",
    olmo2 => "../specs/olmo2.toml",
    phi3 => "../specs/phi3.toml",
    mistral3 => "../specs/mistral3.toml",
    mixtral => "../specs/mixtral.toml",
    gpt_oss => "../specs/gpt_oss.toml",
    qwen3_moe => "../specs/qwen3_moe.toml",
    qwen3_5 => "../specs/qwen3_5.toml",
    qwen3_next => "../specs/qwen3_next.toml",
    deepseek_v2 => "../specs/deepseek_v2.toml",
    deepseek_v3 => "../specs/deepseek_v3.toml",
    glm_moe_dsa => "../specs/glm_moe_dsa.toml",
    nemotron_h => "../specs/nemotron_h.toml",
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

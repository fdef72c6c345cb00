//! Host bindings generated from `runtime/wit/inferlet.wit`.

wasmtime::component::bindgen!({
    world: "inferlet",
    path: "wit",
    // Every import may trap (a bad resource handle) and may wait (passes,
    // client messages) without blocking the thread.
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "pie:inferlet/kv.context": super::kv::ContextRes,
        "pie:inferlet/forward.pending": super::forward::PendingPass,
    },
});

pub use pie::inferlet::{forward, kv, model, runtime, store};

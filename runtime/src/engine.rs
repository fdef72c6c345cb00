//! A loaded model ready to run: architecture chosen from `config.json`, spec
//! lowered against it, ops checked against the driver, weights loaded, and a
//! KV cache sized for the work at hand.

use std::collections::BTreeSet;
use std::path::Path;

use pie_driver::loader::WeightStore;
use pie_driver::{ir, Driver, ForwardBatch, KvDType, KvLayout, KvSlotShape, ModelForward};

use crate::chat_template::ChatTemplate;
use crate::error::PieError;
use crate::model_source::ModelSource;
use crate::registry::{self, Arch};
use crate::sampling::{self, Rng, Sampler};
use crate::tokenizer::Tokenizer;

mod greedy;

/// A requested logits row as [`Engine::forward_outputs`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutput {
    Logits(Vec<f32>),
    Greedy { token: u32, logprob: f32 },
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Tokens per KV page.
    pub page_size: usize,
    /// How the KV cache stores keys and values.
    pub kv_cache_dtype: KvDType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            page_size: 32,
            kv_cache_dtype: KvDType::Auto,
        }
    }
}

/// Progress callback: `(weights loaded, total, tensor name)`.
pub type Progress<'a> = &'a dyn Fn(usize, usize, &str);

pub struct Engine<D: Driver> {
    pub driver: D,
    pub arch: &'static str,
    pub ir: ir::Model,
    model: Box<dyn ModelForward<D>>,
    /// The cache with its page count and recurrent-state rows.
    kv: Option<(D::Kv, usize, usize)>,
    page_size: usize,
    kv_dtype: KvDType,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

impl<D: Driver + 'static> Engine<D> {
    /// Loads a model: a Hugging Face directory (config.json + safetensors)
    /// or a GGUF file (or a directory holding one).
    pub fn load(
        path: &Path,
        driver: D,
        opts: &LoadOptions,
        progress: Option<Progress<'_>>,
    ) -> Result<Self, PieError> {
        Self::from_source(ModelSource::open(path)?, driver, opts, progress)
    }

    /// A model of `config_path`'s architecture and shapes with random bf16
    /// weights (benchmarks); no tokenizer.
    pub fn load_random(
        config_path: &Path,
        driver: D,
        opts: &LoadOptions,
        progress: Option<Progress<'_>>,
    ) -> Result<Self, PieError> {
        let label = config_path.display().to_string();
        let text = std::fs::read_to_string(config_path)
            .map_err(|e| PieError::Input(format!("{label}: {e}")))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PieError::Input(format!("{label}: invalid JSON: {e}")))?;
        let (_, ir) = Self::lower(&config, &label)?;
        let weights = crate::random_weights::RandomWeights::for_model(&ir, 0x5eed)?;
        let files = ModelSource {
            config,
            config_label: label,
            weights: Box::new(weights),
            tokenizer: None,
            chat_template: None,
            stop_ids: Vec::new(),
        };
        Self::from_source(files, driver, opts, progress)
    }

    /// The compiled-in architecture serving `config` and its lowered IR.
    fn lower(config: &serde_json::Value, label: &str) -> Result<(Arch<D>, ir::Model), PieError> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let arch = registry::find_by_model_type::<D>(&model_type).ok_or_else(|| {
            let known: BTreeSet<&str> = registry::architectures::<D>()
                .iter()
                .flat_map(|a| a.hf_model_types.iter().copied())
                .collect();
            PieError::UnsupportedModelType {
                config: label.to_string(),
                model_type: model_type.clone(),
                known: known.into_iter().collect::<Vec<_>>().join(", "),
            }
        })?;
        let spec = pie_archspec::parse(arch.spec_path, arch.spec_text)?;
        let ir = pie_archspec::lower(&spec, config, label)?;
        Ok((arch, ir))
    }

    fn from_source(
        files: ModelSource,
        driver: D,
        opts: &LoadOptions,
        progress: Option<Progress<'_>>,
    ) -> Result<Self, PieError> {
        let (arch, ir) = Self::lower(&files.config, &files.config_label)?;
        check_driver_support(&driver, &ir)?;

        let total = count_weights(&ir);
        let loaded = std::cell::Cell::new(0usize);
        let report = |name: &str| {
            loaded.set(loaded.get() + 1);
            if let Some(p) = progress {
                p(loaded.get(), total, name);
            }
        };
        let (model, f32_matrices) = {
            let mut store =
                WeightStore::new(&driver, files.weights.as_ref()).with_progress(&report);
            let model = (arch.load)(&mut store, &ir)?;
            (model, store.f32_matrices())
        };
        let kv_dtype = driver.resolve_kv_dtype(opts.kv_cache_dtype, f32_matrices);
        crate::heap::trim();
        Ok(Engine {
            driver,
            arch: arch.name,
            ir,
            model,
            kv: None,
            page_size: opts.page_size.max(1),
            kv_dtype,
            tokenizer: files.tokenizer,
            chat_template: files.chat_template,
            stop_ids: files.stop_ids,
        })
    }

    /// A KV cache of at least `pages` pages and recurrent state for `seqs`
    /// sequences (reallocated only to grow).
    fn kv(&mut self, pages: usize, seqs: usize) -> Result<&mut D::Kv, PieError> {
        if self
            .kv
            .as_ref()
            .is_none_or(|(_, have, have_seqs)| *have < pages || *have_seqs < seqs)
        {
            let layout = KvLayout {
                page_size: self.page_size,
                num_pages: pages,
                slots: self
                    .ir
                    .kv_slots
                    .iter()
                    .map(|s| KvSlotShape {
                        kv_heads: s.kv_heads,
                        head_dim: s.head_dim,
                        v_head_dim: s.v_head_dim,
                    })
                    .collect(),
                dtype: self.kv_dtype,
                state_slots: self.ir.state_slots.iter().map(|s| s.conv + s.ssm).collect(),
                max_seqs: seqs,
            };
            self.kv = Some((self.driver.new_kv(&layout)?, pages, seqs));
        }
        Ok(&mut self.kv.as_mut().expect("allocated above").0)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), PieError> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.ir.vocab) {
            return Err(PieError::Input(format!(
                "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..={})",
                self.ir.vocab,
                self.ir.vocab - 1
            )));
        }
        Ok(())
    }

    /// Logits for every position of each prompt, all prompts run as one
    /// ragged batch with their own page tables.
    pub fn prompt_logits(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f32>>>, PieError> {
        let (batch, _) = self.prefill_batch(prompts, 0)?;
        let vocab = self.ir.vocab;
        let rows: Vec<usize> = (0..batch.num_tokens()).collect();
        let flat = self.run(&batch, &rows)?;
        Ok(batch
            .seqs
            .iter()
            .map(|s| {
                (s.start..s.start + s.len)
                    .map(|r| flat[r * vocab..(r + 1) * vocab].to_vec())
                    .collect()
            })
            .collect())
    }

    /// Logits for every position of one prompt, run as consecutive chunks
    /// of at most `chunk` tokens (chunked prefill): each chunk reads the KV
    /// pages and recurrent state the previous ones left.
    pub fn prompt_logits_chunked(
        &mut self,
        prompt: &[u32],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, PieError> {
        let (whole, pages) = self.prefill_batch(&[prompt.to_vec()], 0)?;
        let vocab = self.ir.vocab;
        let mut out = Vec::with_capacity(prompt.len());
        for (i, part) in prompt.chunks(chunk.max(1)).enumerate() {
            let mut batch = ForwardBatch::default();
            batch.push(
                part,
                i * chunk.max(1),
                pages[0].clone(),
                whole.seqs[0].state,
            );
            let rows: Vec<usize> = (0..part.len()).collect();
            let flat = self.run(&batch, &rows)?;
            out.extend(flat.chunks_exact(vocab).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// Generates up to `max_tokens` for each prompt, decoding all sequences
    /// together; a sequence stops at a stop token (which is included).
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
        sampler: &Sampler,
    ) -> Result<Vec<Vec<u32>>, PieError> {
        if sampler.is_greedy() {
            // Only the ids leave the device, and the next step can be
            // queued before they do.
            return self.generate_greedy(prompts, max_tokens);
        }
        let (mut batch, pages) = self.prefill_batch(prompts, max_tokens)?;
        let mut rngs: Vec<Rng> = (0..prompts.len())
            .map(|i| Rng::new(sampler.seed.wrapping_add(i as u64)))
            .collect();
        let mut out = vec![Vec::new(); prompts.len()];
        let mut live: Vec<usize> = (0..prompts.len()).collect();
        let vocab = self.ir.vocab;
        while !live.is_empty() && max_tokens > 0 {
            let rows = batch.last_rows();
            let logits = self.run(&batch, &rows)?;
            let tokens: Vec<u32> = live
                .iter()
                .enumerate()
                .map(|(k, &seq)| {
                    sampling::sample(&logits[k * vocab..(k + 1) * vocab], sampler, &mut rngs[seq])
                })
                .collect();
            let mut next = Vec::new();
            for (k, &seq) in live.iter().enumerate() {
                let token = tokens[k];
                out[seq].push(token);
                if out[seq].len() < max_tokens && !self.stop_ids.contains(&token) {
                    next.push((seq, token));
                }
            }
            live = next.iter().map(|(s, _)| *s).collect();
            batch = decode_batch(
                next.iter()
                    .map(|&(seq, token)| (seq, token, prompts[seq].len() + out[seq].len() - 1)),
                &pages,
            );
        }
        Ok(out)
    }

    /// A batch holding every prompt whole, with pages reserved for
    /// `extra` more tokens per sequence.
    fn prefill_batch(
        &mut self,
        prompts: &[Vec<u32>],
        extra: usize,
    ) -> Result<(ForwardBatch, Vec<Vec<u32>>), PieError> {
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(PieError::Input(
                "empty prompt: give at least one token".into(),
            ));
        }
        for p in prompts {
            self.check_ids(p)?;
        }
        let mut next_page = 0u32;
        let pages: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let n = (p.len() + extra).div_ceil(self.page_size) as u32;
                let pages = (next_page..next_page + n).collect();
                next_page += n;
                pages
            })
            .collect();
        self.kv(next_page as usize, prompts.len())?;
        let batch = ForwardBatch::new(
            prompts
                .iter()
                .zip(&pages)
                .map(|(p, pg)| (p.clone(), 0, pg.clone()))
                .collect(),
        );
        Ok((batch, pages))
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Allocates a KV cache of at least `pages` pages and recurrent state
    /// for `state_rows` sequences. Growing it later drops its contents, so a
    /// caller that manages pages itself (the scheduler) calls this once,
    /// before its first pass.
    pub fn allocate_kv(&mut self, pages: usize, state_rows: usize) -> Result<(), PieError> {
        self.kv(pages, state_rows).map(|_| ())
    }

    /// How the KV cache stores keys and values, once the driver resolved
    /// `auto` for this checkpoint.
    pub fn kv_cache_dtype(&self) -> KvDType {
        self.kv_dtype
    }

    /// KV pages that fit in `utilization` of the device's memory once the
    /// weights are loaded, keeping room for the activations of a batch of
    /// `max_tokens` tokens and `max_rows` logits rows and for `state_rows`
    /// recurrent state rows. None for drivers without a fixed device memory.
    pub fn kv_pages_for_memory(
        &self,
        utilization: f64,
        max_tokens: usize,
        max_rows: usize,
        state_rows: usize,
    ) -> Option<usize> {
        let (free, total) = self.driver.memory_info()?;
        let value_bytes = match self.kv_dtype {
            KvDType::Auto | KvDType::F32 => 4,
            KvDType::Bf16 | KvDType::F16 => 2,
            KvDType::Int8PerTokenHead | KvDType::Fp8E4m3 => 1,
        };
        let per_token: usize = self
            .ir
            .kv_slots
            .iter()
            .map(|s| s.kv_heads * (s.head_dim + s.v_head_dim))
            .sum();
        let page_bytes = (per_token * value_bytes * self.page_size).max(1);
        let state_bytes: usize = self
            .ir
            .state_slots
            .iter()
            .map(|s| (s.conv + s.ssm) * 4 * state_rows)
            .sum();
        let widest = self
            .ir
            .nodes()
            .filter_map(|n| match &n.op {
                ir::NodeOp::Linear(a) => Some(a.out_features),
                _ => None,
            })
            .filter(|&w| w != self.ir.vocab)
            .max()
            .unwrap_or(self.ir.hidden);
        // f32 activations: a few residual-wide buffers (the residual is
        // wider than hidden where a spec carries several streams) and the
        // widest projections alive at once per token, and the logits rows.
        let activations =
            (max_tokens * (8 * self.ir.residual + 3 * widest) + max_rows * self.ir.vocab) * 4;
        let budget = (utilization * total as f64) as usize;
        let used = total.saturating_sub(free);
        let left = budget.saturating_sub(used + activations + state_bytes);
        Some(left / page_bytes)
    }

    /// Whether the model has recurrent layers (Gated DeltaNet, Mamba2),
    /// whose per-sequence state cannot be rewound or rebuilt from pages.
    pub fn has_recurrent_state(&self) -> bool {
        !self.ir.state_slots.is_empty()
    }

    /// Why this model cannot apply custom attention masks: its first
    /// layer that mixes tokens without honouring one (recurrent, MLA).
    pub fn mask_refusal(&self) -> Option<String> {
        self.ir.nodes().filter(|n| n.enabled).find_map(|n| {
            pie_driver::mask_refusal(n.kind()).map(|why| {
                format!(
                    "its `{}` layers cannot apply one: {why}",
                    n.kind().spec_name()
                )
            })
        })
    }

    /// Copies recurrent state row `from` to row `to` (a fork).
    pub fn copy_state(&mut self, from: u32, to: u32) -> Result<(), PieError> {
        let (kv, ..) = self.kv.as_mut().ok_or_else(no_kv)?;
        Ok(self.driver.copy_state(kv, from, to)?)
    }

    /// Copies every layer's keys and values of page `from` into page `to`
    /// (copy on write of a shared page).
    pub fn copy_page(&mut self, from: u32, to: u32) -> Result<(), PieError> {
        let (kv, ..) = self.kv.as_mut().ok_or_else(no_kv)?;
        Ok(self.driver.copy_page(kv, from, to)?)
    }

    /// Runs a batch whose page tables and state rows the caller manages
    /// (see [`Engine::allocate_kv`]) and returns the logits of `rows`, one
    /// vocabulary-sized row after another.
    pub fn forward_rows(
        &mut self,
        batch: &ForwardBatch,
        rows: &[usize],
    ) -> Result<Vec<f32>, PieError> {
        self.check_managed_batch(batch)?;
        self.run(batch, rows)
    }

    /// Like [`Engine::forward_rows`], but rows marked `greedy` come back as
    /// their greedy token and its log-probability, reduced by the driver
    /// (on a GPU, no vocabulary row crosses to the host).
    pub fn forward_outputs(
        &mut self,
        batch: &ForwardBatch,
        rows: &[usize],
        greedy: &[bool],
    ) -> Result<Vec<RowOutput>, PieError> {
        if greedy.len() != rows.len() {
            return Err(PieError::Input(format!(
                "{} greedy flags for {} rows",
                greedy.len(),
                rows.len()
            )));
        }
        self.check_managed_batch(batch)?;
        let (logits, read) = self.forward(batch, rows)?;
        let pick = |want: bool| -> Vec<usize> {
            read.iter()
                .zip(greedy)
                .filter(|(_, &g)| g == want)
                .map(|(&r, _)| r)
                .collect()
        };
        let mut tokens = self.driver.greedy_rows(&logits, &pick(true))?.into_iter();
        let flat = self.driver.read_rows(&logits, &pick(false))?;
        let mut rows_of_logits = flat.chunks_exact(self.ir.vocab.max(1));
        Ok(greedy
            .iter()
            .map(|&g| match g {
                true => {
                    let (token, logprob) = tokens.next().expect("one per greedy row");
                    RowOutput::Greedy { token, logprob }
                }
                false => {
                    RowOutput::Logits(rows_of_logits.next().expect("one per other row").to_vec())
                }
            })
            .collect())
    }

    /// Checks a caller-managed batch against the allocated cache.
    fn check_managed_batch(&self, batch: &ForwardBatch) -> Result<(), PieError> {
        let (pages, state_rows) = self.kv.as_ref().map_or((0, 0), |(_, n, s)| (*n, *s));
        if let Some(&bad) = batch
            .seqs
            .iter()
            .flat_map(|s| &s.pages)
            .find(|&&p| p as usize >= pages)
        {
            return Err(PieError::Input(format!(
                "page {bad} is outside the KV cache ({pages} pages)"
            )));
        }
        if self.has_recurrent_state() {
            if let Some(s) = batch.seqs.iter().find(|s| s.state as usize >= state_rows) {
                return Err(PieError::Input(format!(
                    "recurrent state row {} is outside the cache ({state_rows} rows)",
                    s.state
                )));
            }
        }
        self.check_ids(&batch.tokens)
    }

    fn run(&mut self, batch: &ForwardBatch, rows: &[usize]) -> Result<Vec<f32>, PieError> {
        let (logits, read) = self.forward(batch, rows)?;
        Ok(self.driver.read_rows(&logits, &read)?)
    }

    /// Runs `batch`, computing logits only for `rows`; returns them with
    /// the row indices to read from the result.
    fn forward(
        &mut self,
        batch: &ForwardBatch,
        rows: &[usize],
    ) -> Result<(D::Act, Vec<usize>), PieError> {
        let (kv, _, _) = self.kv.as_mut().expect("prefill_batch allocates the cache");
        let all: Vec<usize> = (0..batch.num_tokens()).collect();
        let (batch, read): (ForwardBatch, Vec<usize>) = if rows == all.as_slice() {
            (batch.clone(), all)
        } else {
            (
                ForwardBatch {
                    outputs: Some(rows.to_vec()),
                    ..batch.clone()
                },
                (0..rows.len()).collect(),
            )
        };
        let (driver, model) = (&self.driver, &self.model);
        let logits = driver.install(|| {
            driver.run_pass(kv, &batch, &mut |kv, batch| {
                model.forward(driver, kv, batch)
            })
        })?;
        Ok((logits, read))
    }
}

/// A decode step of `(sequence, token, position)` rows, each sequence with
/// its pages; recurrent state row = the sequence's index, stable as other
/// sequences finish.
fn decode_batch(
    rows: impl IntoIterator<Item = (usize, u32, usize)>,
    pages: &[Vec<u32>],
) -> ForwardBatch {
    let mut batch = ForwardBatch::default();
    for (seq, token, pos) in rows {
        batch.push(&[token], pos, pages[seq].clone(), seq as u32);
    }
    batch
}

/// Refuses, before loading any weight, a model whose spec uses an op the
/// driver cannot run.
fn check_driver_support<D: Driver>(driver: &D, model: &ir::Model) -> Result<(), PieError> {
    unsupported_op(model, driver.name(), |op| driver.supports(op))
}

/// The first enabled op `supports` refuses, as a user-facing error.
fn unsupported_op(
    model: &ir::Model,
    driver: &'static str,
    supports: impl Fn(ir::OpKind) -> bool,
) -> Result<(), PieError> {
    if let Some(node) = model.nodes().find(|n| n.enabled && !supports(n.kind())) {
        return Err(PieError::UnsupportedOp {
            op: node.kind().spec_name(),
            driver,
            arch: model.arch.clone(),
            origin: node.origin.clone(),
        });
    }
    Ok(())
}

fn count_weights(model: &ir::Model) -> usize {
    let names: BTreeSet<&str> = model
        .nodes()
        .flat_map(|n| n.weights.iter().filter_map(|w| w.name.as_deref()))
        .collect();
    names.len()
}

fn no_kv() -> PieError {
    PieError::Input("no KV cache allocated (call allocate_kv first)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver lacking an op refuses the model before loading weights,
    /// naming the op, the driver and the spec line.
    #[test]
    fn a_model_using_an_unsupported_op_is_refused_with_its_spec_line() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let spec = pie_archspec::load(&root.join("specs/qwen3_5.toml")).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("tests/configs/qwen3_5.json")).unwrap(),
        )
        .unwrap();
        let model = pie_archspec::lower(&spec, &config, "config.json").unwrap();
        let err = unsupported_op(&model, "test", |op| op != ir::OpKind::GatedDeltaNet)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("uses op `gated_delta_net`")
                && err.contains("qwen3_5.toml:")
                && err.contains("`test` driver does not support"),
            "{err}"
        );
        assert!(unsupported_op(&model, "test", |_| true).is_ok());
    }
}

//! One forward call's inputs: the tokens of several sequences laid end to
//! end, with each sequence's positions, KV page table and (optionally) a
//! custom attention mask.

use crate::mask::AttnMask;

/// A contiguous run of tokens of one sequence inside a [`ForwardBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Index of the chunk's first token in `ForwardBatch::tokens`.
    pub start: usize,
    pub len: usize,
    /// Position of the chunk's first token; earlier positions are already in
    /// the KV pages.
    pub first_pos: usize,
    /// Page ids holding this sequence's KV, in position order; must cover
    /// positions `0 .. first_pos + len`.
    pub pages: Vec<u32>,
    /// Row of this sequence's recurrent state (models with Gated DeltaNet
    /// or Mamba2 layers), below `KvLayout::max_seqs`. A chunk starting at
    /// position 0 begins from a zero state; a later chunk continues the
    /// state its sequence's previous chunk left.
    pub state: u32,
    /// Which keys each token attends to; None = causal (token `t` sees
    /// positions `0 ..= first_pos + t`), the fast path every driver keeps.
    pub mask: Option<AttnMask>,
}

impl SeqChunk {
    pub fn kv_len(&self) -> usize {
        self.first_pos + self.len
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    /// Position of every token (same length as `tokens`).
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
    /// Token rows whose logits are wanted, in this order; None = every
    /// token. Decode needs one row per sequence, so the vocabulary
    /// projection skips the rest of the prompt.
    pub outputs: Option<Vec<usize>>,
    /// `tokens` are placeholders: row i's token is id i of the driver's
    /// last [`crate::Driver::argmax_start`], still on the device. Set only
    /// for drivers that [`crate::Driver::feeds_tokens`], so that a decode
    /// step is queued before the host has read the step before it.
    pub fed_tokens: bool,
}

impl ForwardBatch {
    /// A batch from per-sequence chunks given as `(tokens, first_pos,
    /// pages)`; chunk `i` uses recurrent-state row `i`.
    pub fn new(chunks: Vec<(Vec<u32>, usize, Vec<u32>)>) -> Self {
        let mut batch = ForwardBatch::default();
        for (i, (tokens, first_pos, pages)) in chunks.into_iter().enumerate() {
            batch.push(&tokens, first_pos, pages, i as u32);
        }
        batch
    }

    /// Appends one sequence's chunk.
    pub fn push(&mut self, tokens: &[u32], first_pos: usize, pages: Vec<u32>, state: u32) {
        let start = self.tokens.len();
        let len = tokens.len();
        self.positions
            .extend((first_pos..first_pos + len).map(|p| p as u32));
        self.tokens.extend_from_slice(tokens);
        self.seqs.push(SeqChunk {
            start,
            len,
            first_pos,
            pages,
            state,
            mask: None,
        });
    }

    /// For each token row, the index of the sequence chunk it belongs to.
    pub fn row_seqs(&self) -> Vec<usize> {
        self.seqs
            .iter()
            .enumerate()
            .flat_map(|(si, s)| std::iter::repeat_n(si, s.len))
            .collect()
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Index of each sequence's last token: the rows whose logits sample the
    /// next token.
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.start + s.len - 1).collect()
    }

    /// This batch with `tokens` in place of its fed placeholders.
    pub fn with_tokens_fed(&self, tokens: Vec<u32>) -> ForwardBatch {
        ForwardBatch {
            tokens,
            fed_tokens: false,
            ..self.clone()
        }
    }

    /// For a batch with `fed_tokens`: whether the driver's last greedy step,
    /// which chose `chosen` ids (None: no step ran), covers it row for row.
    pub fn check_fed(&self, chosen: Option<usize>) -> crate::Result<()> {
        let rows = self.num_tokens();
        match chosen {
            Some(n) if n == rows => Ok(()),
            Some(n) => Err(crate::DriverError::Invalid(format!(
                "a batch of {rows} rows takes its tokens from the last greedy step, which chose {n}"
            ))),
            None => Err(crate::DriverError::Invalid(
                "a batch takes its tokens from a greedy step, but none ran".into(),
            )),
        }
    }
}

/// Shape of one attention op's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSlotShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// How cached keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDType {
    /// The driver's choice for the checkpoint ([`crate::Driver::resolve_kv_dtype`]):
    /// on the portable driver f32 for f32 checkpoints and f16 for narrower
    /// ones; f32 on the cuda driver.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    /// int8 with one f32 scale per token and head.
    Int8PerTokenHead,
    /// 8-bit float, 4 exponent and 3 mantissa bits (max 448), with one
    /// scale per token and head.
    Fp8E4m3,
}

impl KvDType {
    /// Every dtype, in the order help texts list them.
    pub const ALL: [KvDType; 6] = [
        KvDType::Auto,
        KvDType::F32,
        KvDType::Bf16,
        KvDType::F16,
        KvDType::Int8PerTokenHead,
        KvDType::Fp8E4m3,
    ];

    /// The names `from_name` accepts, derived from [`KvDType::ALL`].
    pub const NAMES: [&'static str; 6] = {
        let mut names = [""; 6];
        let mut i = 0;
        while i < names.len() {
            names[i] = Self::ALL[i].name();
            i += 1;
        }
        names
    };

    pub const fn name(self) -> &'static str {
        match self {
            KvDType::Auto => "auto",
            KvDType::F32 => "f32",
            KvDType::Bf16 => "bf16",
            KvDType::F16 => "f16",
            KvDType::Int8PerTokenHead => "int8_per_token_head",
            KvDType::Fp8E4m3 => "fp8_e4m3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// What to allocate for a model's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub page_size: usize,
    pub num_pages: usize,
    pub slots: Vec<KvSlotShape>,
    pub dtype: KvDType,
    /// f32s of recurrent state per sequence, one entry per recurrent op.
    pub state_slots: Vec<usize>,
    /// Sequences that can hold recurrent state at once (state rows).
    pub max_seqs: usize,
}

#[cfg(test)]
mod tests {
    use super::{ForwardBatch, KvDType};

    #[test]
    fn kv_dtype_names_round_trip() {
        for (dtype, name) in KvDType::ALL.into_iter().zip(KvDType::NAMES) {
            assert_eq!(dtype.name(), name);
            assert_eq!(KvDType::from_name(name), Some(dtype));
        }
        assert_eq!(KvDType::from_name("f8"), None);
    }

    #[test]
    fn fed_tokens_must_cover_the_batch_row_for_row() {
        let batch = ForwardBatch::new(vec![(vec![0], 5, vec![0]), (vec![0], 9, vec![1])]);
        assert!(batch.check_fed(Some(2)).is_ok());
        let short = batch.check_fed(Some(1)).unwrap_err().to_string();
        assert!(
            short.contains("a batch of 2 rows") && short.contains("chose 1"),
            "{short}"
        );
        let none = batch.check_fed(None).unwrap_err().to_string();
        assert!(none.contains("none ran"), "{none}");
    }
}

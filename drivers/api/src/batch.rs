//! One forward call's inputs: the tokens of several sequences laid end to
//! end, with each sequence's positions and KV page table.

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
}

impl ForwardBatch {
    /// A batch from per-sequence chunks given as `(tokens, first_pos, pages)`.
    pub fn new(chunks: Vec<(Vec<u32>, usize, Vec<u32>)>) -> Self {
        let mut batch = ForwardBatch::default();
        for (tokens, first_pos, pages) in chunks {
            let start = batch.tokens.len();
            let len = tokens.len();
            batch
                .positions
                .extend((first_pos..first_pos + len).map(|p| p as u32));
            batch.tokens.extend(tokens);
            batch.seqs.push(SeqChunk {
                start,
                len,
                first_pos,
                pages,
            });
        }
        batch
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Index of each sequence's last token: the rows whose logits sample the
    /// next token.
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.start + s.len - 1).collect()
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
    /// The driver's activation type (f32 on the portable driver).
    #[default]
    Auto,
    Bf16,
    F16,
    /// int8 with one f32 scale per token and head.
    Int8PerTokenHead,
    /// 8-bit float, 4 exponent and 3 mantissa bits (max 448).
    Fp8E4m3,
}

impl KvDType {
    pub const NAMES: [&'static str; 5] = ["auto", "bf16", "f16", "int8_per_token_head", "fp8_e4m3"];

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => KvDType::Auto,
            "bf16" => KvDType::Bf16,
            "f16" => KvDType::F16,
            "int8_per_token_head" => KvDType::Int8PerTokenHead,
            "fp8_e4m3" => KvDType::Fp8E4m3,
            _ => return None,
        })
    }
}

/// What to allocate for a model's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    pub page_size: usize,
    pub num_pages: usize,
    pub slots: Vec<KvSlotShape>,
    pub dtype: KvDType,
}

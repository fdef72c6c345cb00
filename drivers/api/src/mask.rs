//! Custom attention masks: which key positions each token of a sequence
//! chunk attends to, when that is not the causal default.
//!
//! A chunk's mask has one row per token of the chunk and one bit per key
//! position `0 .. kv_len` of its sequence (the tokens already cached, then
//! the chunk's own tokens), so a row may look at any cached token and at any
//! token of its own chunk, before or after itself (tree drafts, prefix-LM
//! prompts). Rows are packed 32 keys to a `u32` word, little end first:
//! bit `j % 32` of word `j / 32` is key `j`. A batch without masks carries
//! nothing, and drivers keep their causal path for it.

use crate::ir::OpKind;
use crate::{DriverError, ForwardBatch, Result};

/// Why `op`, which mixes tokens, cannot apply a custom mask; None for ops
/// that can (attention) or that never look at other tokens. The runtime
/// refuses masked passes on such models up front; drivers check again.
pub fn mask_refusal(op: OpKind) -> Option<&'static str> {
    match op {
        // A recurrent state is a running summary of every earlier token:
        // there is no per-key score a mask could hide.
        OpKind::GatedDeltaNet | OpKind::Mamba2 => {
            Some("its state sums every earlier token, so there are no keys to hide")
        }
        OpKind::MlaAttention => Some("the latent (MLA) attention kernels take no mask yet"),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnMask {
    rows: usize,
    keys: usize,
    words: Vec<u32>,
}

impl AttnMask {
    /// A mask of `rows` tokens over `keys` key positions that hides every
    /// key (set the visible ones with [`AttnMask::allow`]).
    pub fn hidden(rows: usize, keys: usize) -> Self {
        AttnMask {
            rows,
            keys,
            words: vec![0; rows * keys.div_ceil(32)],
        }
    }

    /// The mask of `rows`, each `keys` entries long (true = attends).
    pub fn from_rows(rows: &[Vec<bool>], keys: usize) -> Result<Self> {
        let mut mask = AttnMask::hidden(rows.len(), keys);
        for (i, row) in rows.iter().enumerate() {
            if row.len() != keys {
                return Err(DriverError::Invalid(format!(
                    "attention mask row {i} has {} entries; every row needs {keys} (one per key position)",
                    row.len()
                )));
            }
            for (j, _) in row.iter().enumerate().filter(|(_, &b)| b) {
                mask.allow(i, j);
            }
        }
        Ok(mask)
    }

    pub fn allow(&mut self, row: usize, key: usize) {
        assert!(
            row < self.rows && key < self.keys,
            "mask entry out of range"
        );
        let at = row * self.words_per_row() + key / 32;
        self.words[at] |= 1 << (key % 32);
    }

    pub fn allows(&self, row: usize, key: usize) -> bool {
        key < self.keys && self.words[row * self.words_per_row() + key / 32] >> (key % 32) & 1 == 1
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Key positions each row covers.
    pub fn keys(&self) -> usize {
        self.keys
    }

    pub fn words_per_row(&self) -> usize {
        self.keys.div_ceil(32)
    }

    /// Every row's words, row after row (what a device kernel reads).
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Whether this is exactly the causal mask of a chunk whose first
    /// token sits at position `first_pos` (row `i` sees keys
    /// `0 ..= first_pos + i`), which needs no mask at all.
    pub fn is_causal(&self, first_pos: usize) -> bool {
        self.keys == first_pos + self.rows
            && (0..self.rows)
                .all(|i| (0..self.keys).all(|j| self.allows(i, j) == (j <= first_pos + i)))
    }

    /// The first row that attends to no key, if any (its softmax would
    /// have nothing to normalize).
    pub fn empty_row(&self) -> Option<usize> {
        let w = self.words_per_row();
        (0..self.rows).find(|&i| self.words[i * w..(i + 1) * w].iter().all(|&x| x == 0))
    }
}

impl ForwardBatch {
    /// Whether any sequence chunk carries a custom mask.
    pub fn has_masks(&self) -> bool {
        self.seqs.iter().any(|s| s.mask.is_some())
    }

    /// Checks that each mask has one row per token of its chunk and one
    /// column per key position of its sequence.
    pub fn check_masks(&self) -> Result<()> {
        for (i, s) in self.seqs.iter().enumerate() {
            let Some(m) = &s.mask else { continue };
            if m.rows() != s.len || m.keys() != s.kv_len() {
                return Err(DriverError::Invalid(format!(
                    "sequence {i}: its attention mask is {}×{}, the chunk needs {}×{} (tokens × key positions)",
                    m.rows(),
                    m.keys(),
                    s.len,
                    s.kv_len()
                )));
            }
        }
        Ok(())
    }

    /// Refuses a batch with custom masks for an op that cannot apply one,
    /// instead of silently running it causally.
    pub fn refuse_masks(&self, op: OpKind) -> Result<()> {
        match (self.has_masks(), mask_refusal(op)) {
            (true, Some(why)) => Err(DriverError::Invalid(format!(
                "`{}` layers cannot apply a custom attention mask: {why}",
                op.spec_name()
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_across_word_boundaries() {
        let rows = vec![
            (0..40).map(|j| j % 3 == 0).collect::<Vec<_>>(),
            (0..40).map(|j| j == 39).collect(),
        ];
        let m = AttnMask::from_rows(&rows, 40).unwrap();
        assert_eq!(m.words_per_row(), 2);
        for (i, row) in rows.iter().enumerate() {
            for (j, &b) in row.iter().enumerate() {
                assert_eq!(m.allows(i, j), b, "({i}, {j})");
            }
        }
        assert_eq!(m.empty_row(), None);
    }

    #[test]
    fn causal_and_empty_rows_are_recognized() {
        let causal: Vec<Vec<bool>> = (0..3)
            .map(|i| (0..5).map(|j| j <= 2 + i).collect())
            .collect();
        assert!(AttnMask::from_rows(&causal, 5).unwrap().is_causal(2));
        let mut tree = causal.clone();
        tree[2][3] = false;
        assert!(!AttnMask::from_rows(&tree, 5).unwrap().is_causal(2));
        tree[1] = vec![false; 5];
        assert_eq!(AttnMask::from_rows(&tree, 5).unwrap().empty_row(), Some(1));
    }

    #[test]
    fn a_row_of_the_wrong_length_is_refused() {
        let err = AttnMask::from_rows(&[vec![true; 3], vec![true; 2]], 3).unwrap_err();
        assert!(err.to_string().contains("row 1 has 2 entries"), "{err}");
    }
}

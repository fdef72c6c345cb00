//! A pass's custom attention mask, checked and packed for the driver.
//!
//! The mask has one row per input token of the pass; row `i` has one entry
//! per key position the pass can see: the context's `ctx_len` cached
//! tokens, then the pass's own `n` tokens, in cache order (`ctx_len + n`
//! entries; true = token `i` attends to that key). A row may hide cached
//! tokens, hide earlier tokens of the pass (tree siblings), or show later
//! ones (a bidirectional prompt prefix). The causal mask (row `i` true up to
//! `ctx_len + i`) is recognized and dropped, so it costs nothing and is
//! accepted by every model.

use pie_driver::AttnMask;

/// What decides whether a model and the scheduler can take a mask.
pub(super) struct MaskLimits<'a> {
    /// Why this model cannot apply custom masks (recurrent or MLA layers).
    pub refusal: Option<&'a str>,
    /// A masked pass runs in one batch, so it must fit one.
    pub max_forward_tokens: usize,
}

/// Checks `rows` for a pass of `n` tokens on a context of `ctx_len` and
/// packs it; None for the causal mask.
pub(super) fn pack(
    rows: &[Vec<bool>],
    n: usize,
    ctx_len: usize,
    limits: &MaskLimits,
) -> Result<Option<AttnMask>, String> {
    if rows.len() != n {
        return Err(format!(
            "the attention mask has {} rows for {n} input tokens: give one row per token",
            rows.len()
        ));
    }
    let keys = ctx_len + n;
    if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != keys) {
        return Err(format!(
            "attention mask row {i} has {} entries; each row needs {keys}: one per key position, \
             the context's {ctx_len} cached tokens then the pass's {n} tokens",
            row.len()
        ));
    }
    let mask = AttnMask::from_rows(rows, keys).map_err(|e| e.to_string())?;
    if mask.is_causal(ctx_len) {
        return Ok(None);
    }
    if let Some(i) = mask.empty_row() {
        return Err(format!(
            "attention mask row {i} attends to no position: every token must see at least one key"
        ));
    }
    if let Some(why) = limits.refusal {
        return Err(format!(
            "this model cannot take a custom attention mask: {why}"
        ));
    }
    if n > limits.max_forward_tokens {
        return Err(format!(
            "a pass with a custom attention mask runs in one batch, but its {n} tokens exceed \
             max_forward_tokens ({})",
            limits.max_forward_tokens
        ));
    }
    Ok(Some(mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: MaskLimits = MaskLimits {
        refusal: None,
        max_forward_tokens: 8,
    };

    fn causal(ctx: usize, n: usize) -> Vec<Vec<bool>> {
        (0..n)
            .map(|i| (0..ctx + n).map(|j| j <= ctx + i).collect())
            .collect()
    }

    #[test]
    fn the_causal_mask_is_dropped_and_a_tree_is_kept() {
        assert_eq!(pack(&causal(3, 2), 2, 3, &OPEN), Ok(None));
        let mut tree = causal(3, 2);
        tree[1][3] = false; // siblings
        let m = pack(&tree, 2, 3, &OPEN).unwrap().unwrap();
        assert!(m.allows(1, 4) && !m.allows(1, 3) && m.allows(0, 3));
    }

    #[test]
    fn bad_shapes_and_unsupported_models_are_refused() {
        let err = |rows: &[Vec<bool>], limits: &MaskLimits| pack(rows, 2, 3, limits).unwrap_err();
        assert!(err(&causal(3, 1), &OPEN).contains("1 rows for 2 input tokens"));
        let mut short = causal(3, 2);
        short[1].pop();
        assert!(err(&short, &OPEN).contains("row 1 has 4 entries; each row needs 5"));
        let mut blind = causal(3, 2);
        blind[0] = vec![false; 5];
        assert!(err(&blind, &OPEN).contains("row 0 attends to no position"));
        let mut tree = causal(3, 2);
        tree[1][3] = false;
        let recurrent = MaskLimits {
            refusal: Some("`mamba2` layers cannot apply a custom attention mask"),
            ..OPEN
        };
        assert!(err(&tree, &recurrent).contains("`mamba2` layers"));
        // The causal mask stays acceptable on such a model.
        assert_eq!(pack(&causal(3, 2), 2, 3, &recurrent), Ok(None));
        let small = MaskLimits {
            max_forward_tokens: 1,
            ..OPEN
        };
        assert!(err(&tree, &small).contains("exceed max_forward_tokens (1)"));
    }
}

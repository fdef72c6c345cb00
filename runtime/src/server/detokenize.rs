//! Incremental detokenization and stop sequences: tokens come in one at a
//! time, text goes out in pieces that are whole UTF-8 characters and that
//! concatenate to what decoding all the tokens at once gives.

use crate::tokenizer::Tokenizer;

/// Decodes a growing token list into text deltas. A token that ends in
/// the middle of a character (byte-level tokenizers) yields nothing until
/// the character is complete. Decoding runs over a short window of recent
/// tokens, so each step costs the same however long the output is; the
/// window starts one emitted token back so word-initial spaces survive.
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens whose text has been emitted.
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Detokenizer {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token; returns the text that became certain.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| e.to_string());
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() {
            return Ok(String::new());
        }
        match now.get(before.len()..) {
            Some(delta) if now.starts_with(&before) => {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(delta)
            }
            _ => Ok(String::new()),
        }
    }

    /// The text of tokens not emitted yet (an incomplete character at the
    /// very end comes out as U+FFFD, as a full decode gives it).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, String> {
        let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| e.to_string());
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now
            .strip_prefix(before.as_str())
            .map(str::to_string)
            .unwrap_or_default())
    }
}

impl Default for Detokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds back text that may be the start of a stop sequence, and cuts the
/// output where one appears (the stop sequence itself is not returned).
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    /// Adds text; returns what can be sent, and whether a stop sequence
    /// was reached (then nothing more is to be sent).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of a stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Everything held back (the output ended without a stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_and_hold_back() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("D more"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a EN"), ("a ".to_string(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
        assert_eq!(m.push("E"), (String::new(), false));
        assert_eq!(m.finish(), "E");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("aé"), ("a".to_string(), false));
        assert_eq!(m.push("!"), (String::new(), true));
    }
}

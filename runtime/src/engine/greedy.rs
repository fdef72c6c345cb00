//! Greedy generation with the next decode step queued before the host has
//! read the current one's tokens.
//!
//! A decode step's tokens are the step before's argmax. Read back first,
//! they leave the GPU idle while the host copies them, decides who stops
//! and stages the next batch (on a small model, several percent of a
//! step). Where the driver [`Driver::feeds_tokens`], step n + 1 is queued
//! with `fed_tokens` — its tokens are step n's ids, still on the device —
//! and only then are step n's ids read. The next step is speculated only
//! while every sequence of the step in flight is still running and has
//! room for another token; a sequence that stops on the ids read then has
//! one row of wasted work in the step already queued, whose id is dropped,
//! and the step after it is built on the host as before. Other drivers
//! run the same loop one step at a time.

use pie_driver::{Driver, ForwardBatch, PendingIds};

use super::{decode_batch, Engine};
use crate::error::PieError;

/// A decode step in flight: its ids, and the sequence of each row (never
/// none: a generation without prompts returns before its first step).
struct InFlight {
    ids: PendingIds,
    seqs: Vec<usize>,
}

impl<D: Driver + 'static> Engine<D> {
    /// [`Engine::generate`] with greedy sampling.
    pub(super) fn generate_greedy(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<u32>>, PieError> {
        let (batch, pages) = self.prefill_batch(prompts, max_tokens)?;
        let mut out = vec![Vec::new(); prompts.len()];
        if max_tokens == 0 || prompts.is_empty() {
            return Ok(out);
        }
        let mut finished = vec![false; prompts.len()];
        let mut in_flight = Some(self.start_step(&batch, (0..prompts.len()).collect())?);
        let position = |out: &[Vec<u32>], seq: usize| prompts[seq].len() + out[seq].len();
        while let Some(step) = in_flight.take() {
            // Queue the next step on the device-held ids if every row of
            // this one will want another token unless its id is a stop.
            let speculate = self.driver.feeds_tokens()
                && step
                    .seqs
                    .iter()
                    .all(|&s| !finished[s] && out[s].len() + 1 < max_tokens);
            let queued = if speculate {
                let rows = step.seqs.iter().map(|&seq| (seq, 0, position(&out, seq)));
                let next = ForwardBatch {
                    fed_tokens: true,
                    ..decode_batch(rows, &pages)
                };
                Some(self.start_step(&next, step.seqs.clone())?)
            } else {
                None
            };
            let ids = step.ids.wait()?;
            let mut running = Vec::new();
            for (&seq, &token) in step.seqs.iter().zip(&ids) {
                if finished[seq] {
                    continue; // a speculated row past the sequence's end
                }
                out[seq].push(token);
                if out[seq].len() >= max_tokens || self.stop_ids.contains(&token) {
                    finished[seq] = true;
                } else {
                    running.push((seq, token));
                }
            }
            in_flight = match queued {
                Some(next) => Some(next),
                None if running.is_empty() => None,
                None => {
                    let rows = running
                        .iter()
                        .map(|&(seq, token)| (seq, token, position(&out, seq) - 1));
                    let next = decode_batch(rows, &pages);
                    let seqs = running.iter().map(|&(s, _)| s).collect();
                    Some(self.start_step(&next, seqs)?)
                }
            };
        }
        Ok(out)
    }

    /// Queues `batch` and the argmax of each sequence's last row.
    fn start_step(&mut self, batch: &ForwardBatch, seqs: Vec<usize>) -> Result<InFlight, PieError> {
        let (logits, read) = self.forward(batch, &batch.last_rows())?;
        let ids = self.driver.argmax_start(&logits, &read)?;
        Ok(InFlight { ids, seqs })
    }
}

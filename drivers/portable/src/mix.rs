//! `mix`: a small matrix per token that recombines equal parts of an
//! activation (AltUp's parallel residual streams, or one vector scaled by
//! a per-token number for each output part).

use pie_driver::ir::MixAttrs;
use pie_driver::{DriverError, Result};
use rayon::prelude::*;

use crate::tensor::Act;

/// Output part `m` of each row is `Σ_n (offset + coefs[m·streams + n]) ·`
/// part `n` of `x`.
pub fn mix(x: &Act, coefs: &Act, a: &MixAttrs) -> Result<Act> {
    let (n, m, d) = (a.streams, a.out_streams, a.width);
    if x.width != n * d || coefs.width != m * n || x.rows != coefs.rows {
        return Err(DriverError::Invalid(format!(
            "mix of [{}, {}] by coefficients [{}, {}] (expected widths {} and {})",
            x.rows,
            x.width,
            coefs.rows,
            coefs.width,
            n * d,
            m * n
        )));
    }
    let mut out = Act::zeros(x.rows, m * d);
    out.data
        .par_chunks_mut(m * d)
        .enumerate()
        .for_each(|(r, row)| {
            let (xr, cr) = (x.row(r), coefs.row(r));
            for (mi, part) in row.chunks_mut(d).enumerate() {
                for (ni, src) in xr.chunks(d).enumerate() {
                    let c = a.offset + cr[mi * n + ni];
                    part.iter_mut().zip(src).for_each(|(o, v)| *o += c * v);
                }
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_streams_per_token() {
        // Two streams of width 2; output 0 = 1·s0 + 2·s1, output 1 = s1.
        let x = Act {
            data: vec![1.0, 2.0, 10.0, 20.0],
            rows: 1,
            width: 4,
        };
        let coefs = Act {
            data: vec![1.0, 2.0, 0.0, 1.0],
            rows: 1,
            width: 4,
        };
        let a = MixAttrs {
            streams: 2,
            out_streams: 2,
            width: 2,
            offset: 0.0,
        };
        assert_eq!(mix(&x, &coefs, &a).unwrap().data, [21.0, 42.0, 10.0, 20.0]);
    }

    #[test]
    fn one_stream_scales_per_output_with_offset() {
        let x = Act {
            data: vec![1.0, 2.0],
            rows: 1,
            width: 2,
        };
        let coefs = Act {
            data: vec![0.0, 2.0],
            rows: 1,
            width: 2,
        };
        let a = MixAttrs {
            streams: 1,
            out_streams: 2,
            width: 2,
            offset: 1.0,
        };
        assert_eq!(mix(&x, &coefs, &a).unwrap().data, [1.0, 2.0, 3.0, 6.0]);
    }
}

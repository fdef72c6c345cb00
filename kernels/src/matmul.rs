//! `out = x · Wᵀ` with W row-major `[n, k]` (Hugging Face's linear layout),
//! f32 activations and f32/bf16/f16 weights widened on the fly.
//!
//! Both operands are read along `k`, so every output is a dot product of
//! two contiguous runs; the kernels keep that "dot form" instead of packing
//! W into a transposed panel, because packing a half-precision matrix per
//! call would cost as much as a batch-1 matmul itself.
//!
//! Work is split over output features (rows of W): each rayon task owns a
//! contiguous band of W, so at batch 1 the threads together stream W exactly
//! once and the kernel runs at memory bandwidth. For larger batches a task
//! widens its band to f32 one `k`-block at a time and reuses that block for
//! every activation row, so the conversion is paid once per weight, not once
//! per weight per token.
//!
//! Two implementations share one driver: AVX2+FMA+F16C intrinsics, picked at
//! run time, and a portable one written so the compiler vectorizes it for
//! whatever the target offers (NEON on aarch64, SSE2 on old x86).

use half::{bf16, f16};
use rayon::prelude::*;

/// A row-major weight matrix `[n, k]`.
///
/// Weights stay in their file dtype so a bf16 model streams half the bytes
/// per token; the kernels widen to f32 as they go, never the whole matrix.
#[derive(Clone, Copy, Debug)]
pub enum WeightMatrix<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl WeightMatrix<'_> {
    fn elems(&self) -> usize {
        match self {
            WeightMatrix::F32(w) => w.len(),
            WeightMatrix::Bf16(w) => w.len(),
            WeightMatrix::F16(w) => w.len(),
        }
    }
}

/// Which kernel implementation runs.
///
/// Public so tests and benchmarks can pin the portable path on a machine
/// that would otherwise always take the SIMD one; production code calls
/// [`matmul`], which uses [`Path::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AVX2 + FMA + F16C intrinsics.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust shaped for auto-vectorization.
    Portable,
}

impl Path {
    /// The fastest path this CPU supports. Feature detection runs once: the
    /// answer cannot change and the lookup sits on every matmul call.
    pub fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            static HAS_AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let has = *HAS_AVX2.get_or_init(|| {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            });
            if has {
                return Path::Avx2;
            }
        }
        Path::Portable
    }

    /// Whether this CPU can run the path (the portable one always can).
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => Path::detect() == Path::Avx2,
            Path::Portable => true,
        }
    }

    /// Every path this CPU can run, best first; lets tests cover them all.
    pub fn supported() -> Vec<Path> {
        let mut paths = vec![Path::detect()];
        if paths[0] != Path::Portable {
            paths.push(Path::Portable);
        }
        paths
    }
}

/// `out[i*n + j] = Σ_t x[i*k + t] · w[j*k + t]`; `x` is `[m, k]`, `out` is
/// `[m, n]` and is overwritten.
///
/// Panics if a slice length disagrees with the shape: callers validate
/// shapes against the model first, so a mismatch here is a bug.
pub fn matmul(x: &[f32], m: usize, k: usize, w: WeightMatrix<'_>, n: usize, out: &mut [f32]) {
    matmul_with(Path::detect(), x, m, k, w, n, out);
}

/// [`matmul`] on a chosen [`Path`]; panics if the CPU cannot run it.
pub fn matmul_with(
    path: Path,
    x: &[f32],
    m: usize,
    k: usize,
    w: WeightMatrix<'_>,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(
        Some(x.len()),
        m.checked_mul(k),
        "matmul: x has {} elements, expected {m}×{k}",
        x.len()
    );
    assert_eq!(
        Some(w.elems()),
        n.checked_mul(k),
        "matmul: w has {} elements, expected {n}×{k}",
        w.elems()
    );
    assert_eq!(
        Some(out.len()),
        m.checked_mul(n),
        "matmul: out has {} elements, expected {m}×{n}",
        out.len()
    );
    assert!(
        path.is_supported(),
        "matmul: this CPU cannot run the {path:?} path"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match w {
        WeightMatrix::F32(w) => driver(path, x, m, k, w, n, out),
        WeightMatrix::Bf16(w) => driver(path, x, m, k, w, n, out),
        WeightMatrix::F16(w) => driver(path, x, m, k, w, n, out),
    }
}

/// Copies rows `ids` of `table` (`[vocab, k]`) into `out` (`[ids.len(), k]`)
/// as f32.
///
/// Panics on an id outside the table: the driver rejects bad token ids with
/// a proper error before calling, so reaching one here is a bug.
pub fn gather_rows(table: WeightMatrix<'_>, k: usize, ids: &[u32], out: &mut [f32]) {
    gather_rows_with(Path::detect(), table, k, ids, out);
}

/// [`gather_rows`] on a chosen [`Path`]; panics if the CPU cannot run it.
pub fn gather_rows_with(
    path: Path,
    table: WeightMatrix<'_>,
    k: usize,
    ids: &[u32],
    out: &mut [f32],
) {
    assert_eq!(
        Some(out.len()),
        ids.len().checked_mul(k),
        "gather_rows: out has {} elements, expected {}×{k}",
        out.len(),
        ids.len()
    );
    assert!(
        path.is_supported(),
        "gather_rows: this CPU cannot run the {path:?} path"
    );
    if k == 0 {
        return;
    }
    assert_eq!(
        table.elems() % k,
        0,
        "gather_rows: table has {} elements, not a whole number of rows of {k}",
        table.elems()
    );
    let vocab = table.elems() / k;
    fn go<W: Elem>(path: Path, t: &[W], k: usize, vocab: usize, ids: &[u32], out: &mut [f32]) {
        for (dst, &id) in out.chunks_exact_mut(k).zip(ids) {
            let id = id as usize;
            assert!(
                id < vocab,
                "gather_rows: id {id} is outside the table of {vocab} rows"
            );
            widen(path, &t[id * k..(id + 1) * k], dst);
        }
    }
    match table {
        WeightMatrix::F32(t) => go(path, t, k, vocab, ids, out),
        WeightMatrix::Bf16(t) => go(path, t, k, vocab, ids, out),
        WeightMatrix::F16(t) => go(path, t, k, vocab, ids, out),
    }
}

/// Dot product of two f32 slices of equal length on the detected path;
/// exported for attention-style callers that need one dot at a time.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    let mut s = 0f32;
    // SAFETY: one row each of `a.len()` readable elements, one output.
    unsafe {
        tile(
            Path::detect(),
            1,
            1,
            Tile {
                x: a.as_ptr(),
                ldx: 0,
                w: b.as_ptr(),
                ldw: 0,
                kc: a.len(),
                out: &mut s,
                ldo: 0,
                accumulate: false,
            },
        );
    }
    s
}

// ---------------------------------------------------------------------------
// Element types

/// A weight element type the kernels can widen to f32.
trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Loads 8 elements widened to f32.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C, and `p` has 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for bf16 {
    /// bf16 is the high half of an f32, so widening is a shift; unlike
    /// `half`'s conversion this has no branch and vectorizes.
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// IEEE half → single, exact for every input.
///
/// Written with selects instead of `half`'s branches so a loop over it
/// vectorizes; the portable path has no F16C to lean on.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let mag = h & 0x7fff;
    // Normal numbers: move exponent and mantissa into place and rebias the
    // exponent from 15 to 127.
    let normal = (mag << 13) + ((127 - 15) << 23);
    // Subnormals are mantissa · 2⁻²⁴, which f32 represents exactly.
    let subnormal = (mag as f32 * (1.0 / 16_777_216.0)).to_bits();
    // Inf and NaN keep their mantissa (so NaN payloads survive).
    let special = (mag << 13) | 0x7f80_0000;
    let bits = if mag < 0x0400 {
        subnormal
    } else if mag >= 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(sign | bits)
}

/// Widens a run of weights to f32 on `path`.
fn widen<W: Elem>(path: Path, src: &[W], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul_with`/`gather_rows_with` checked the CPU supports
        // the path before any kernel runs.
        Path::Avx2 => unsafe { avx2::widen(src, dst) },
        Path::Portable => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driver

/// Activation rows per register tile. With [`NR`] this gives 12 vector
/// accumulators plus 3 widened weight vectors: 15 of the 16 ymm registers,
/// the largest dot-form tile that does not spill.
const MR: usize = 4;
/// Weight rows per register tile when several activation rows share them.
const NR: usize = 3;
/// Weight rows per tile at batch 1: eight independent accumulators cover
/// the FMA latency (4 cycles × 2 ports) when the weights come from cache.
const NR_GEMV: usize = 8;
/// `k` extent of one widened weight block: a task's block (at most 72 rows
/// × 512 f32 = 144 KiB) stays in L2 while every activation row sweeps it.
/// Longer blocks mean fewer horizontal sums and output updates per tile;
/// 512 measured a few percent faster than 256.
const KC: usize = 512;
/// Most activation rows per task. Each band re-reads its task's activations
/// once; capping them at 512 rows (4 MiB at k = 2048) keeps that re-read in
/// L3, and the weight block is still widened once per 512 rows.
const MB: usize = 512;
/// Below this many multiply-adds a call runs on the caller's thread: waking
/// the pool costs a few microseconds, more than the work itself.
const SERIAL_MACS: usize = 1 << 16;

/// A raw pointer into the output that tasks may share.
///
/// Tasks write disjoint `(rows, cols)` rectangles of `out`; a column band
/// of a row-major matrix is not a contiguous slice, so safe splitting
/// (`chunks_mut`) cannot express it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own rectangle (see `driver`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the `Sync` wrapper
    /// rather than the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn driver<W: Elem>(path: Path, x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let serial = threads == 1 || m.saturating_mul(n).saturating_mul(k) < SERIAL_MACS;
    let par = if serial { 1 } else { threads };
    // Aim for ~8 bands per thread so rayon can balance uneven cores, but no
    // band under 24 rows (scheduling overhead) or over 72 (the widened
    // block must stay in L2). Multiples of 24 avoid narrow edge tiles for
    // both NR = 3 and NR_GEMV = 8.
    let nb = n.div_ceil(8 * par).div_ceil(24).clamp(1, 3) * 24;
    let n_tasks = n.div_ceil(nb);
    // Split the batch too when there are too few bands to feed every
    // thread, but keep ≥ 8 rows per task so the widened block is reused.
    let mb = if m <= MR {
        m
    } else {
        let want = (4 * par).div_ceil(n_tasks);
        m.div_ceil(want).next_multiple_of(MR).clamp(8, MB).min(m)
    };
    let m_tasks = m.div_ceil(mb);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (i0, j0) = ((t / n_tasks) * mb, (t % n_tasks) * nb);
        let (i1, j1) = ((i0 + mb).min(m), (j0 + nb).min(n));
        // SAFETY: task `t` owns rows i0..i1 × columns j0..j1 of `out`, and
        // the tasks' rectangles tile `out` without overlap.
        unsafe { band(path, x, k, w, n, i0..i1, j0..j1, out_ptr.get()) };
    };
    if serial {
        (0..m_tasks * n_tasks).for_each(task);
    } else {
        (0..m_tasks * n_tasks).into_par_iter().for_each(task);
    }
}

/// Computes `out[rows, cols]`.
///
/// # Safety
/// `out` points at an `[m, n]` matrix whose `rows × cols` rectangle no one
/// else accesses during the call; shapes were validated by `matmul_with`.
#[allow(clippy::too_many_arguments)]
unsafe fn band<W: Elem>(
    path: Path,
    x: &[f32],
    k: usize,
    w: &[W],
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: *mut f32,
) {
    let mt = rows.len();
    if mt <= MR {
        // One tile row of activations: every weight is touched once, so
        // widening in registers costs no more than widening to a buffer and
        // saves the round trip through memory. This is the decode path.
        let nr_main = if mt == 1 { NR_GEMV } else { NR };
        let mut j = cols.start;
        while j < cols.end {
            let nr = tile_width(nr_main, cols.end - j);
            tile(
                path,
                mt,
                nr,
                Tile {
                    x: x.as_ptr().add(rows.start * k),
                    ldx: k,
                    w: w.as_ptr().add(j * k),
                    ldw: k,
                    kc: k,
                    out: out.add(rows.start * n + j),
                    ldo: n,
                    accumulate: false,
                },
            );
            j += nr;
        }
        return;
    }
    // Several tile rows: widen a block of the band once, then sweep every
    // activation row over it.
    let mut buf = vec![0f32; cols.len() * KC.min(k)];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for (jj, j) in cols.clone().enumerate() {
            widen(
                path,
                &w[j * k + k0..j * k + k0 + kc],
                &mut buf[jj * kc..(jj + 1) * kc],
            );
        }
        // Activation tile outermost: its 4 rows stay in L1 while the
        // widened block streams from L2 beneath it.
        for i in rows.clone().step_by(MR) {
            let mr = MR.min(rows.end - i);
            let mut jj = 0;
            while jj < cols.len() {
                let nr = tile_width(NR, cols.len() - jj);
                tile(
                    path,
                    mr,
                    nr,
                    Tile {
                        x: x.as_ptr().add(i * k + k0),
                        ldx: k,
                        w: buf.as_ptr().add(jj * kc),
                        ldw: kc,
                        kc,
                        out: out.add(i * n + cols.start + jj),
                        ldo: n,
                        accumulate: k0 > 0,
                    },
                );
                jj += nr;
            }
        }
    }
}

/// Tile width for `left` remaining weight rows: the main width while it
/// fits, then at most [`NR`] so the edge uses instantiated shapes.
fn tile_width(main: usize, left: usize) -> usize {
    if left >= main {
        main
    } else {
        left.min(NR)
    }
}

/// One micro-kernel call: `out[r*ldo + c] (+)= Σ_{t<kc} x[r*ldx + t] · w[c*ldw + t]`
/// for `r < mr`, `c < nr`.
#[derive(Clone, Copy)]
struct Tile<W> {
    x: *const f32,
    ldx: usize,
    w: *const W,
    ldw: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    /// Add to `out` (later `k` blocks) instead of overwriting it.
    accumulate: bool,
}

/// Runs the `mr × nr` micro-kernel. Tile shapes are const generics so the
/// accumulator arrays live in registers; this match is the only place the
/// run-time shape meets them.
///
/// # Safety
/// `t.x` has `mr` rows of `t.kc` readable f32 at stride `t.ldx`, `t.w` has
/// `nr` rows of `t.kc` readable elements at stride `t.ldw`, `t.out` has `mr`
/// rows of `nr` writable f32 at stride `t.ldo`, and `path` is supported.
unsafe fn tile<W: Elem>(path: Path, mr: usize, nr: usize, t: Tile<W>) {
    macro_rules! shapes {
        ($(($m:literal, $n:literal)),*) => {
            match (mr, nr) {
                $(($m, $n) => match path {
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx2 => avx2::tile::<W, $m, $n>(t),
                    Path::Portable => portable::tile::<W, $m, $n>(t),
                },)*
                _ => unreachable!("no {mr}×{nr} tile"),
            }
        };
    }
    shapes!(
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 8),
        (2, 1),
        (2, 2),
        (2, 3),
        (3, 1),
        (3, 2),
        (3, 3),
        (4, 1),
        (4, 2),
        (4, 3)
    );
}

// ---------------------------------------------------------------------------
// Portable micro-kernel

mod portable {
    use super::{Elem, Tile};

    /// Each output is its own dot product over sixteen-lane array
    /// accumulators: the one loop shape LLVM reliably maps onto any vector
    /// width, and sixteen lanes give four independent add chains on
    /// 128-bit targets (SSE, NEON), enough to hide the add latency. Larger
    /// register tiles tempt LLVM's SLP vectorizer into shuffling across
    /// rows instead. The fixed lane count keeps the summation order the
    /// same on every target.
    ///
    /// # Safety
    /// As for [`super::tile`].
    #[inline(never)]
    pub unsafe fn tile<W: Elem, const MR: usize, const NR: usize>(t: Tile<W>) {
        for r in 0..MR {
            let x = std::slice::from_raw_parts(t.x.add(r * t.ldx), t.kc);
            for c in 0..NR {
                let w = std::slice::from_raw_parts(t.w.add(c * t.ldw), t.kc);
                let s = dot(x, w);
                let o = t.out.add(r * t.ldo + c);
                *o = if t.accumulate { *o + s } else { s };
            }
        }
    }

    #[inline(always)]
    fn dot<W: Elem>(x: &[f32], w: &[W]) -> f32 {
        const LANES: usize = 16;
        let mut acc = [0f32; LANES];
        let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
        let (xt, wt) = (xc.remainder(), wc.remainder());
        for (x, w) in xc.zip(wc) {
            // Widening into an array first measured faster than widening
            // inside the multiply: LLVM then converts full vectors at once.
            let wv: [f32; LANES] = std::array::from_fn(|l| w[l].to_f32());
            for l in 0..LANES {
                acc[l] += x[l] * wv[l];
            }
        }
        // Pairwise, so the halves fold like a vector reduction would.
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                acc[l] += acc[l + width];
            }
        }
        let mut s = acc[0];
        for (x, w) in xt.iter().zip(wt) {
            s += x * w.to_f32();
        }
        s
    }
}

// ---------------------------------------------------------------------------
// AVX2 micro-kernel

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Elem, Tile};
    use std::arch::x86_64::*;

    /// # Safety
    /// As for [`super::tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<W: Elem, const MR: usize, const NR: usize>(t: Tile<W>) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let k8 = t.kc / 8 * 8;
        let mut i = 0;
        while i < k8 {
            // Widen each weight vector once and reuse it for all MR rows;
            // activations are re-read from L1 instead (they need no work).
            let mut wv = [_mm256_setzero_ps(); NR];
            for (c, wv) in wv.iter_mut().enumerate() {
                *wv = W::load8(t.w.add(c * t.ldw + i));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(t.x.add(r * t.ldx + i));
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(xv, *wv, *acc);
                }
            }
            i += 8;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                let mut s = hsum(*acc);
                for i in k8..t.kc {
                    s += *t.x.add(r * t.ldx + i) * (*t.w.add(c * t.ldw + i)).to_f32();
                }
                let o = t.out.add(r * t.ldo + c);
                *o = if t.accumulate { *o + s } else { s };
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; `src` and `dst` have equal lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen<W: Elem>(src: &[W], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let k8 = n / 8 * 8;
        let mut i = 0;
        while i < k8 {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), W::load8(src.as_ptr().add(i)));
            i += 8;
        }
        for i in k8..n {
            dst[i] = src[i].to_f32();
        }
    }
}

#[cfg(test)]
mod tests;

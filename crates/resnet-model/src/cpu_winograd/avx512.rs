//! Winograd's input and output transforms on AVX-512, for CPUs where
//! [`cpu_gemm512::available`](crate::cpu_gemm512::available) holds: the same arithmetic as
//! the portable loops (so the same results, bit for bit), 16 lanes at a time, with the two
//! reshuffles that stay scalar there done in registers: picking every N-th element of an
//! input row (the windows' columns) and turning a tile's outputs, channels along the lanes,
//! into rows of the NCHW output, which they reach with the bias, residual and ReLU added
//! (the portable path goes through a row buffer and a copy).
//!
//! Every function here needs AVX-512F: callers check `available()` first (the plan's
//! `avx512` flag).

use super::{Lane, Variant};
use std::arch::x86_64::*;
use std::ops::{Add, Mul, Sub};

/// 16 floats in a vector. Only made by the loads below, which run on AVX-512 CPUs only.
#[derive(Clone, Copy)]
pub(super) struct Z(__m512);

impl Add for Z {
    type Output = Z;
    #[inline(always)]
    fn add(self, other: Z) -> Z {
        // SAFETY: a `Z` exists only where AVX-512F is available (see the type).
        Z(unsafe { _mm512_add_ps(self.0, other.0) })
    }
}

impl Sub for Z {
    type Output = Z;
    #[inline(always)]
    fn sub(self, other: Z) -> Z {
        // SAFETY: as in `add`.
        Z(unsafe { _mm512_sub_ps(self.0, other.0) })
    }
}

impl Mul<f32> for Z {
    type Output = Z;
    #[inline(always)]
    fn mul(self, factor: f32) -> Z {
        // SAFETY: as in `add`.
        Z(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(factor)) })
    }
}

impl Lane for Z {}

/// The first `len` lanes (all 16 from 16 on).
#[inline(always)]
fn mask(len: usize) -> __mmask16 {
    if len >= 16 {
        0xffff
    } else {
        ((1u32 << len) - 1) as __mmask16
    }
}

/// [`super::apply`] on vectors: `dst[l][j] = f(src[0][j], .., src[K-1][j])[l]` for `j < len`,
/// 16 columns at a time. A vector past `len` is masked, on loads only where a source ends
/// there too (a masked store's value is not forwarded to a later load, so sources written
/// just before are best read whole).
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn apply<const K: usize, const L: usize>(
    src: [&[f32]; K],
    dst: [&mut [f32]; L],
    len: usize,
    f: impl Fn([Z; K]) -> [Z; L],
) {
    let dst = dst.map(|d| d[..len].as_mut_ptr());
    for j in (0..len).step_by(16) {
        let mask = mask(len - j);
        // Plain loops rather than `map` or `from_fn`: their closures would not be inlined
        // here (they lack AVX-512), and every vector would pass through memory.
        let mut x = [Z(_mm512_setzero_ps()); K];
        for (x, s) in x.iter_mut().zip(&src) {
            assert!(s.len() >= len, "transform source too short");
            // SAFETY: lanes j..j + 16 where the source has them, else masked to `len`.
            *x = Z(unsafe {
                if s.len() >= j + 16 {
                    _mm512_loadu_ps(s.as_ptr().add(j))
                } else {
                    _mm512_maskz_loadu_ps(mask, s.as_ptr().add(j))
                }
            });
        }
        for (d, y) in dst.iter().zip(f(x)) {
            // SAFETY: lanes j..j + 16 masked to `len`, inside each destination, which
            // overlaps no source.
            unsafe {
                if len >= j + 16 {
                    _mm512_storeu_ps(d.add(j), y.0)
                } else {
                    _mm512_mask_storeu_ps(d.add(j), mask, y.0)
                }
            };
        }
    }
}

/// `row[i]` for the 16 columns `i = start + l`, `l < 16`, zero where `i` falls outside the
/// row (`start` may be negative).
///
/// # Safety
/// AVX-512F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_padded(row: &[f32], start: isize) -> __m512 {
    let len = row.len() as isize;
    let (low, high) = ((-start).clamp(0, 16), (len - start).clamp(0, 16));
    if high <= low {
        return _mm512_setzero_ps();
    }
    let mask = (mask(high as usize) as u32 & !(mask(low as usize) as u32)) as __mmask16;
    // SAFETY: only the unmasked lanes, columns within the row, are read (masked lanes do not
    // fault, and the base pointer is only formed, wrapping, never dereferenced itself).
    unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_offset(start)) }
}

/// Lanes `0, N, 2N, ..` (16 of them) of the zero-padded row from column `start` (`N` is 2 or
/// 4).
///
/// # Safety
/// AVX-512F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn every_nth<const N: usize>(row: &[f32], start: isize) -> __m512 {
    // SAFETY: load_padded reads inside the row only.
    unsafe {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let a = load_padded(row, start);
        let b = load_padded(row, start + 16);
        if N == 2 {
            return _mm512_permutex2var_ps(a, even, b);
        }
        debug_assert_eq!(N, 4);
        // Every 4th of a:b and of c:d in lanes 0..8, then those halves side by side.
        let fourth = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
        let halves = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        let c = load_padded(row, start + 32);
        let d = load_padded(row, start + 48);
        let low = _mm512_permutex2var_ps(a, fourth, b);
        let high = _mm512_permutex2var_ps(c, fourth, d);
        _mm512_permutex2var_ps(low, halves, high)
    }
}

/// The horizontal half of the input transform for one input row, `pad` zeros before it and
/// as many as needed after: tile `j`'s window is padded columns `N * j..N * j + A`, and
/// `dst[b][j]` gets element `b` of `Bt` applied to it, for `j < len` (a multiple of 16).
/// `row` is `None` for a row of the padding (all zeros).
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn input_row<V: Variant<N, A>, const N: usize, const A: usize>(
    row: Option<&[f32]>,
    pad: usize,
    dst: [&mut [f32]; A],
    len: usize,
) {
    assert_eq!(len % 16, 0, "input rows run whole vectors");
    let dst = dst.map(|d| d[..len].as_mut_ptr());
    for j in (0..len).step_by(16) {
        let mut d = [Z(_mm512_setzero_ps()); A];
        if let Some(row) = row {
            for (k, d) in d.iter_mut().enumerate() {
                let start = (N * j + k) as isize - pad as isize;
                // SAFETY: AVX-512F is available (the caller's contract).
                *d = Z(unsafe { every_nth::<N>(row, start) });
            }
        }
        for (d, y) in dst.iter().zip(V::input(d)) {
            // SAFETY: lanes j..j + 16 of each destination (len is a multiple of 16).
            unsafe { _mm512_storeu_ps(d.add(j), y.0) };
        }
    }
}

/// Transpose of the 16 x 16 matrix whose rows are `r`: lane `i` of result `j` is lane `j` of
/// `r[i]`.
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512; 16]) -> [__m512; 16] {
    // Within each 128-bit block: 4 x 4 transposes of rows 4i..4i + 4 (unpacks of 32-bit, then
    // 64-bit elements); then the blocks: block b of result row 4c + e holds block c of the
    // rows 4b..4b + 4's element e.
    let ps = _mm512_castpd_ps;
    let pd = _mm512_castps_pd;
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let [a, b, c, d] = [r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]];
        let ab_lo = _mm512_unpacklo_ps(a, b);
        let ab_hi = _mm512_unpackhi_ps(a, b);
        let cd_lo = _mm512_unpacklo_ps(c, d);
        let cd_hi = _mm512_unpackhi_ps(c, d);
        // Per block: element e of rows a, b, c, d in t[4i + e].
        t[4 * i] = ps(_mm512_unpacklo_pd(pd(ab_lo), pd(cd_lo)));
        t[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
        t[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(ab_hi), pd(cd_hi)));
        t[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
    }
    // t[4i + e] block c = rows 4i..4i + 4, column 4c + e. Result row 4c + e is blocks
    // t[e], t[4 + e], t[8 + e], t[12 + e], each at its block c.
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        // Blocks (c = 0, 1 of t[e]), (c = 0, 1 of t[4 + e]) and so on, then the same for c =
        // 2, 3: shuffle_f32x4 picks two blocks of each operand.
        let lo01 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[e], t[4 + e]);
        let lo23 = _mm512_shuffle_f32x4::<0b01_00_01_00>(t[8 + e], t[12 + e]);
        let hi01 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[e], t[4 + e]);
        let hi23 = _mm512_shuffle_f32x4::<0b11_10_11_10>(t[8 + e], t[12 + e]);
        // lo01 = [t[e].0, t[e].1, t[4+e].0, t[4+e].1]: block c of each source at 2 * src + c.
        out[e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(lo01, lo23);
        out[4 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(lo01, lo23);
        out[8 + e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(hi01, hi23);
        out[12 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(hi01, hi23);
    }
    out
}

/// Where one tile row's outputs go, and what is added to them on the way.
pub(super) struct OutRows<'a> {
    /// Output `(oc, p, x)` of the tile row (channel, row within the tile row, column) at
    /// `out + oc * plane + p * width + x`.
    pub out: *mut f32,
    /// The residual, laid out as `out`.
    pub residual: Option<*const f32>,
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
    /// Floats per channel plane.
    pub plane: usize,
    /// Output columns (floats per row).
    pub width: usize,
    /// Output rows of this tile row: `N`, fewer at the bottom edge.
    pub rows: usize,
}

/// `act(y + bias + residual)` into the output rows for `G = 16 / (N * N)` tiles from tile `j`
/// of a tile row, as the portable epilogue computes it. `tiles` holds, for each tile `g < G`,
/// its `N * N` outputs `(p, q)` as rows of `m` floats (output channels along the row); output
/// `(p, q)` of tile `g` is column `N * (j + g) + q` of row `p`. Columns past the output's
/// width are not written. Returns whether every value before the ReLU was finite.
///
/// # Safety
/// AVX-512F must be available; `tiles` must hold `16 * m` floats; `to` must describe
/// writable output (and readable residual) rows for every channel `oc < m`, with `N * j`
/// inside the width.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_tiles<const N: usize>(
    tiles: &[f32],
    m: usize,
    to: &OutRows,
    j: usize,
) -> bool {
    assert!(tiles.len() >= 16 * m, "tile outputs too short");
    assert!(N * j < to.width, "tile past the output");
    // Lane p * run + g * N + q of a channel's vector holds output (p, q) of tile g: its row p
    // then is lanes p * run..(p + 1) * run, side by side in the output row.
    let run = 16 / N;
    let source: [usize; 16] = std::array::from_fn(|lane| {
        let (p, rest) = (lane / run, lane % run);
        let (g, q) = (rest / N, rest % N);
        (g * N * N + p * N + q) * m
    });
    let columns = mask((to.width - N * j).min(run)) as u32;
    let zero = _mm512_setzero_ps();
    let mut finite = true;
    for oc in (0..m).step_by(16) {
        let count = (m - oc).min(16);
        let valid = mask(count);
        let mut rows = [zero; 16];
        for (row, start) in rows.iter_mut().zip(source) {
            // SAFETY: row `start` of `tiles` has `m` floats from it; lanes masked to m.
            *row = unsafe { _mm512_maskz_loadu_ps(valid, tiles.as_ptr().add(start + oc)) };
        }
        let channels = transpose(rows);
        for (c, &values) in channels.iter().enumerate().take(count) {
            let bias = _mm512_set1_ps(to.bias.map_or(0.0, |b| b[oc + c]));
            let sum = _mm512_add_ps(values, bias);
            for p in 0..to.rows {
                // Lanes p * run.. go to row p from column N * j: addresses are formed p * run
                // lanes before (wrapping: they may lie before the buffer), but only the masked
                // lanes, inside it, are touched.
                let at = (oc + c) * to.plane + p * to.width + N * j;
                let lanes = (columns << (p * run)) as __mmask16;
                let mut v = sum;
                if let Some(residual) = to.residual {
                    let from = residual.wrapping_add(at).wrapping_sub(p * run);
                    // SAFETY: the caller's contract covers the masked lanes.
                    v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(lanes, from) });
                }
                // v - v is 0 where v is finite, NaN where it is infinite or NaN.
                let ok = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(lanes, _mm512_sub_ps(v, v), zero);
                finite &= ok == lanes;
                if to.relu {
                    // max(0, v) keeps v where both are zero (-0 stays) or v is NaN, as
                    // `relu_nan`.
                    v = _mm512_max_ps(zero, v);
                }
                let dst = to.out.wrapping_add(at).wrapping_sub(p * run);
                // SAFETY: the caller's contract covers the masked lanes.
                unsafe { _mm512_mask_storeu_ps(dst, lanes, v) };
            }
        }
    }
    finite
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        if !crate::cpu_gemm512::available() {
            return;
        }
        let values: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512F is available; each load reads 16 of the 256 values.
        let got = unsafe {
            let rows: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(values[16 * i..].as_ptr()));
            transpose(rows)
        };
        let mut out = [0.0f32; 256];
        for (i, row) in got.iter().enumerate() {
            // SAFETY: 16 floats into out[16 * i..].
            unsafe { _mm512_storeu_ps(out[16 * i..].as_mut_ptr(), *row) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * i + j], values[16 * j + i], "({i}, {j})");
            }
        }
    }
}

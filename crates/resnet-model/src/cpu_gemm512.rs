//! Winograd's products on AVX-512: `dst = lhs * rhs` with both operands read where they lie.
//!
//! Each of Winograd's 16 or 36 products per work unit is small (a unit's tiles by 64-512
//! channels, over 64-512 input channels), so the `gemm` crate's packing of both operands for
//! every call is a large part of it. Here a 6 x 64 tile of the output stays in 24 registers
//! over a block of up to [`DEPTH_BLOCK`] rows of `rhs`: one element of each of 6 `lhs` rows is
//! broadcast per step (any row and column stride: Winograd's `lhs` is a transposed view), 4
//! vectors of the `rhs` row loaded, 24 FMAs. Row tails take narrower instances of the same
//! kernel; the last vector of a row is masked. The summation order depends on the sizes only.
//!
//! The kernel's accumulator array stays in registers only while LLVM unrolls every per-tile
//! loop: keep those loops plain (a branch more in the store loop, or the array passed by
//! `&mut`, spilled all 24 accumulators to the stack at every step, 2.3-2.8x slower).

use crate::cpu_conv::Mat;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Output rows per tile.
const ROWS: usize = 6;
/// Vectors of 16 columns per tile.
const VECTORS: usize = 4;
/// Columns per tile: `rhs` is read in panels of this many columns.
pub(crate) const PANEL: usize = VECTORS * 16;
/// Rows of `rhs` summed in registers before the tile is stored (and, for the next block,
/// loaded back and added): rounding grows with this, not with the whole depth.
const DEPTH_BLOCK: usize = 256;

/// Whether [`product`] runs on this machine (AVX-512F; checked once).
pub(crate) fn available() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n)`, single-threaded: as
/// [`gemm_mat`](crate::cpu_conv::gemm_mat) without accumulation, `lhs` with any strides, `rhs`
/// in panels of [`PANEL`] columns, `rhs_panel` floats apart, each with contiguous rows
/// (`cs == 1`) `rhs.rs` apart: a row-major `rhs` has `rhs_panel == PANEL`; one stored panel
/// by panel (each `k x PANEL`, rows `PANEL` apart) `rhs_panel == k * PANEL`, which keeps a
/// panel's rows together (wide rows put each of them in another page).
///
/// # Safety
/// [`available`] must have returned true. `lhs` and `rhs` must be valid for reads of the
/// elements their strides address for these sizes, `dst` for writes of `m` rows of `n` floats
/// `dst_rs` apart, aliasing neither (it may be uninitialized: each element is written before it
/// is read).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    rhs_panel: usize,
) {
    debug_assert_eq!(rhs.cs, 1, "rhs rows must be contiguous");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        avx512::product(m, n, k, dst, dst_rs, lhs, rhs, rhs_panel)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, dst, dst_rs, lhs, rhs, rhs_panel);
        unreachable!("cpu_gemm512::product called where it is not available");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// One tile: where its output and operands start.
    struct Tile {
        dst: *mut f32,
        dst_rs: usize,
        lhs: *const f32,
        lhs_rs: usize,
        lhs_cs: usize,
        rhs: *const f32,
        rhs_rs: usize,
        depth: usize,
        /// Lanes of the last vector inside the matrix.
        tail: __mmask16,
        /// Whether this is the first depth block (else the stored sum is added).
        first: bool,
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: usize,
        lhs: Mat,
        rhs: Mat,
        rhs_panel: usize,
    ) {
        let (lhs, lhs_rs, lhs_cs) = (lhs.ptr, lhs.rs, lhs.cs);
        let (rhs, rhs_rs) = (rhs.ptr, rhs.rs);
        let panel = PANEL;
        let mut k0 = 0;
        loop {
            let depth = DEPTH_BLOCK.min(k - k0);
            let mut p0 = 0;
            while p0 < n {
                let width = panel.min(n - p0);
                let vectors = width.div_ceil(16);
                let rem = width - (vectors - 1) * 16;
                let tail = if rem == 16 { !0 } else { (1u16 << rem) - 1 };
                let mut r0 = 0;
                while r0 < m {
                    let rows = ROWS.min(m - r0);
                    // SAFETY: the pointers address this tile's part of each matrix.
                    let tile = unsafe {
                        Tile {
                            dst: dst.add(r0 * dst_rs + p0),
                            dst_rs,
                            lhs: lhs.add(r0 * lhs_rs + k0 * lhs_cs),
                            lhs_rs,
                            lhs_cs,
                            rhs: rhs.add(k0 * rhs_rs + p0 / panel * rhs_panel),
                            rhs_rs,
                            depth,
                            tail,
                            first: k0 == 0,
                        }
                    };
                    // SAFETY: the kernel touches `rows` rows and `vectors` vectors of it.
                    unsafe { dispatch(rows, vectors, &tile) };
                    r0 += rows;
                }
                p0 += width;
            }
            k0 += depth;
            if k0 >= k {
                break;
            }
        }
    }

    /// Run the kernel instance for this tile's size.
    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch(rows: usize, vectors: usize, t: &Tile) {
        macro_rules! by_vectors {
            ($r:literal) => {
                match vectors {
                    1 => kernel::<$r, 1>(t),
                    2 => kernel::<$r, 2>(t),
                    3 => kernel::<$r, 3>(t),
                    _ => kernel::<$r, 4>(t),
                }
            };
        }
        // SAFETY: the caller's contract.
        unsafe {
            match rows {
                1 => by_vectors!(1),
                2 => by_vectors!(2),
                3 => by_vectors!(3),
                4 => by_vectors!(4),
                5 => by_vectors!(5),
                _ => by_vectors!(6),
            }
        }
    }

    /// Mask of vector `v` of a tile of `V` vectors.
    #[inline(always)]
    fn mask<const V: usize>(t: &Tile, v: usize) -> __mmask16 {
        if v + 1 == V { t.tail } else { !0 }
    }

    /// One `R x (16 V)` tile over `t.depth` rows of `rhs`.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const V: usize>(t: &Tile) {
        // SAFETY (whole body): the tile's pointers address R rows of V vectors (the last one
        // masked) of dst, R rows of `depth` lhs elements and `depth` rows of V vectors of rhs.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            let mut b = t.rhs;
            for d in 0..t.depth {
                let mut x = [_mm512_setzero_ps(); V];
                for (v, x) in x.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(mask::<V>(t, v), b.add(v * 16));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*t.lhs.add(r * t.lhs_rs + d * t.lhs_cs));
                    for (a, &x) in row.iter_mut().zip(&x) {
                        *a = _mm512_fmadd_ps(w, x, *a);
                    }
                }
                b = b.add(t.rhs_rs);
            }
            if !t.first {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, a) in row.iter_mut().enumerate() {
                        let dst = t.dst.add(r * t.dst_rs + v * 16);
                        *a = _mm512_add_ps(_mm512_maskz_loadu_ps(mask::<V>(t, v), dst), *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    let dst = t.dst.add(r * t.dst_rs + v * 16);
                    _mm512_mask_storeu_ps(dst, mask::<V>(t, v), a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_winograd::tests::values;

    /// Every row and column tail, one and several depth blocks, `lhs` row-major and
    /// transposed, a destination row stride wider than its rows: against an f64 product.
    #[test]
    fn matches_an_f64_product() {
        if !available() {
            eprintln!("skipped: this machine has no AVX-512F");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 64, 3),
            (7, 65, 17),
            (13, 130, DEPTH_BLOCK + 5),
            (5, 47, 2 * DEPTH_BLOCK),
            (12, 200, 64),
        ] {
            for transposed in [false, true] {
                let data = values(m * k, 1);
                // Element (i, d) of lhs: row-major, or stored as its transpose (k x m).
                let (lhs, lhs_rs, lhs_cs) = if transposed {
                    (Mat::row_major(&data, m).transposed(), 1, m)
                } else {
                    (Mat::row_major(&data, k), k, 1)
                };
                let rhs_rs = n + 3;
                let rhs = values(k * rhs_rs, 2);
                // The same rhs panel by panel: element (d, j) at panel j / PANEL, row d.
                let mut by_panel = vec![f32::NAN; n.div_ceil(PANEL) * k * PANEL];
                for d in 0..k {
                    for j in 0..n {
                        by_panel[(j / PANEL * k + d) * PANEL + j % PANEL] = rhs[d * rhs_rs + j];
                    }
                }
                for panelled in [false, true] {
                    let case =
                        format!("({m}, {n}, {k}) transposed {transposed}, by panel {panelled}");
                    let (rhs_mat, rhs_panel) = if panelled {
                        (Mat::row_major(&by_panel, PANEL), k * PANEL)
                    } else {
                        (Mat::row_major(&rhs, rhs_rs), PANEL)
                    };
                    let dst_rs = n + 5;
                    let mut dst = vec![f32::MAX; m * dst_rs];
                    // SAFETY: the sizes as documented; `available()` checked.
                    unsafe { product(m, n, k, dst.as_mut_ptr(), dst_rs, lhs, rhs_mat, rhs_panel) };
                    for i in 0..m {
                        for j in 0..dst_rs {
                            let got = dst[i * dst_rs + j];
                            if j >= n {
                                assert_eq!(got, f32::MAX, "{case} wrote past row {i}");
                                continue;
                            }
                            let want: f64 = (0..k)
                                .map(|d| {
                                    f64::from(data[i * lhs_rs + d * lhs_cs])
                                        * f64::from(rhs[d * rhs_rs + j])
                                })
                                .sum();
                            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                            assert!(
                                (f64::from(got) - want).abs() <= tol,
                                "{case} at ({i}, {j}): {got} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

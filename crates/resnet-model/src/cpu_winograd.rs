//! Winograd F(2x2, 3x3) for the large 3x3 stride-1 convolutions (a third of ResNet-50's
//! convolution time, most of ResNet-18's): each 2x2 block of outputs comes from a 4x4 input
//! tile through 16 products instead of 36, so the GEMM work drops 2.25x.
//!
//! With the transforms `Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`,
//! `G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]` and `At = [[1,1,1,0],[0,1,-1,-1]]`, the
//! output block of tile `d` is `At [(G g Gt) * (Bt d B)] A` summed over input channels: the
//! elementwise product becomes 16 GEMMs `M[xi] = U[xi] (out x in) * V[xi] (in x tiles)`.
//! The coefficients are 0, +-1 and +-1/2, so the rounding stays at direct convolution's level
//! (the tests hold it to the same tolerance against Burn's convolution).
//!
//! Work units are runs of tile rows (2 output rows each) across the batch, sized so that the
//! transformed inputs and products of a unit stay in cache; the plan depends on the shape
//! only, never on the thread count, so results do not either.

use super::cpu_conv::{BALANCED_UNITS, Conv2dGeometry, Mat, SharedOut, gemm_mat, relu_nan};
use rayon::prelude::*;
use std::cell::RefCell;
/// A unit's transformed inputs (16 x in_channels x tiles) and products (16 x out_channels x
/// tiles) stay within about this many floats together.
const UNIT_FLOATS: usize = 512 * 1024;

/// Fewer tiles per GEMM than this and the direct convolution is faster.
const MIN_TILES_PER_UNIT: usize = 32;

/// With fewer input or output channels than this the transforms cost more than the GEMM saves.
const MIN_CHANNELS: usize = 64;

/// Outputs narrower than this take the direct path: ResNet-50's 512-channel 7x7 convolution
/// measured 1.6x slower here (4x4 tiles for 49 outputs, and 16 MiB of transformed weights
/// per call).
const MIN_OUTPUT_SIDE: usize = 14;

/// How a convolution is cut: runs of `rows_per_unit` tile rows over `batch * tiles_h` rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    tiles_h: usize,
    tiles_w: usize,
    rows_per_unit: usize,
    units: usize,
}

impl Plan {
    /// The plan for `geo`, or `None` where this path does not apply or would not pay.
    pub(crate) fn new(geo: &Conv2dGeometry) -> Option<Self> {
        let applies = crate::ops::winograd()
            && geo.kernel == [3, 3]
            && geo.stride == [1, 1]
            && geo.dilation == [1, 1]
            && geo.groups == 1
            && geo.in_channels.min(geo.out_channels) >= MIN_CHANNELS
            && geo.pad_begin[0] <= 2
            && geo.pad_begin[1] <= 2
            && geo.out_h.min(geo.out_w) >= MIN_OUTPUT_SIDE;
        if !applies {
            return None;
        }
        let (tiles_h, tiles_w) = (geo.out_h.div_ceil(2), geo.out_w.div_ceil(2));
        let rows = geo.batch * tiles_h;
        let per_tile = 16 * (geo.in_channels + geo.out_channels);
        let fit_rows = (UNIT_FLOATS / (per_tile * tiles_w)).max(1);
        // A multiple of BALANCED_UNITS units, so that 1, 2 or 4 threads share them evenly.
        let units = rows
            .div_ceil(fit_rows)
            .next_multiple_of(BALANCED_UNITS)
            .min(rows);
        let rows_per_unit = rows.div_ceil(units);
        let units = rows.div_ceil(rows_per_unit);
        (rows_per_unit * tiles_w >= MIN_TILES_PER_UNIT).then_some(Self {
            tiles_h,
            tiles_w,
            rows_per_unit,
            units,
        })
    }
}

/// Per-thread scratch: transformed inputs, products, row buffers and output rows.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
    y: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `U = G g Gt` for every (output, input) channel pair: 16 matrices of `in x out`, row-major
/// (output channels contiguous, as the GEMM reads them without packing).
fn transform_weights(geo: &Conv2dGeometry, weight: &[f32]) -> Vec<f32> {
    let (m, c) = (geo.out_channels, geo.in_channels);
    let g_rows = |g: [f32; 3]| {
        [
            g[0],
            0.5 * (g[0] + g[1] + g[2]),
            0.5 * (g[0] - g[1] + g[2]),
            g[2],
        ]
    };
    // Block by input channel: each block writes 16 contiguous runs of `m` values.
    let blocks: Vec<Vec<f32>> = (0..c)
        .into_par_iter()
        .map(|ic| {
            let mut block = vec![0.0f32; 16 * m];
            for oc in 0..m {
                let g = &weight[(oc * c + ic) * 9..][..9];
                // t = G g (4 x 3), then U = t Gt (4 x 4).
                let cols = [0, 1, 2].map(|j| g_rows([g[j], g[3 + j], g[6 + j]]));
                for a in 0..4 {
                    let row = g_rows([cols[0][a], cols[1][a], cols[2][a]]);
                    for (b, &v) in row.iter().enumerate() {
                        block[(a * 4 + b) * m + oc] = v;
                    }
                }
            }
            block
        })
        .collect();
    let mut u = vec![0.0f32; 16 * c * m];
    for (ic, block) in blocks.iter().enumerate() {
        for xi in 0..16 {
            u[(xi * c + ic) * m..][..m].copy_from_slice(&block[xi * m..(xi + 1) * m]);
        }
    }
    u
}

/// `act(conv2d(x, weight) + bias + residual)` in NCHW for a geometry with a [`Plan`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    geo: &Conv2dGeometry,
    plan: &Plan,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let u = transform_weights(geo, weight);
    let len = geo.output_len();
    // Not zeroed: every output row is written once, by the unit holding its tile row.
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedOut(out.as_mut_ptr());
    let run = |unit: usize| {
        let first = unit * plan.rows_per_unit;
        let rows = first..(first + plan.rows_per_unit).min(geo.batch * plan.tiles_h);
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: the unit writes only the output rows of its tile rows, which no other
            // unit covers; `out` has the output's length.
            unsafe {
                run_unit(
                    geo,
                    plan,
                    scratch,
                    rows,
                    x,
                    &u,
                    bias,
                    residual,
                    relu,
                    shared.ptr(),
                )
            }
        });
    };
    if rayon::current_num_threads() == 1 {
        (0..plan.units).for_each(run);
    } else {
        (0..plan.units).into_par_iter().for_each(run);
    }
    // SAFETY: the units' tile rows cover every (image, tile row), and each writes all output
    // rows of its tile rows (both, or one at an odd bottom edge) for every channel.
    unsafe { out.set_len(len) };
    out
}

/// One unit: tile rows `rows` (batch-wide: `image * tiles_h + tile_row`).
///
/// # Safety
/// `out` must be valid for writes of the output (`batch * out_channels * out_h * out_w`
/// floats, possibly uninitialized: rows are written whole before anything reads them), and no
/// other thread may touch the output rows of these tile rows during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn run_unit(
    geo: &Conv2dGeometry,
    plan: &Plan,
    scratch: &mut Scratch,
    rows: std::ops::Range<usize>,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    out: *mut f32,
) {
    let (c, m) = (geo.in_channels, geo.out_channels);
    let tw = plan.tiles_w;
    let tiles = rows.len() * tw;
    let plane_in = geo.in_h * geo.in_w;
    let plane_out = geo.out_h * geo.out_w;
    let Scratch {
        v,
        m: prod,
        rows: buf,
        y,
    } = scratch;
    v.resize(16 * c * tiles, 0.0);
    prod.resize(16 * m * tiles, 0.0);
    // One zero-padded input row (2 * tw + 2 elements), its even and odd halves, and four
    // slots of h[b][j].
    let padded = 2 * tw + 2;
    buf.resize(padded + 2 * (tw + 1) + 16 * tw, 0.0);
    let (row_buf, rest) = buf.split_at_mut(padded);
    let (halves, h) = rest.split_at_mut(2 * (tw + 1));

    // V = Bt d B for every tile and input channel: V[xi][channel][tile]. The horizontal half,
    // h[b][j] = (d0 - d2, d1 + d2, d2 - d1, d1 - d3) of an input row's window at 2j, is kept
    // per row in one of four slots: the next tile row of the same image reuses two of them.
    for channel in 0..c {
        let mut previous = None;
        let mut slots = [0usize, 1, 2, 3];
        for (i, row) in rows.clone().enumerate() {
            let (image, ty) = (row / plan.tiles_h, row % plan.tiles_h);
            let plane = &x[(image * c + channel) * plane_in..][..plane_in];
            let first_new = if ty > 0 && previous == Some((image, ty - 1)) {
                slots = [slots[2], slots[3], slots[0], slots[1]];
                2
            } else {
                0
            };
            previous = Some((image, ty));
            for (r, &slot) in slots.iter().enumerate().skip(first_new) {
                let iy = (2 * ty + r) as isize - geo.pad_begin[0] as isize;
                row_buf.fill(0.0);
                if (0..geo.in_h as isize).contains(&iy) {
                    let src = &plane[iy as usize * geo.in_w..][..geo.in_w];
                    // Input column ix sits at ix + pad in the padded row.
                    let pad = geo.pad_begin[1];
                    let len = geo.in_w.min(padded - pad);
                    row_buf[pad..pad + len].copy_from_slice(&src[..len]);
                }
                // Even and odd elements apart, so that the windows are contiguous slices.
                let (even, odd) = halves.split_at_mut(tw + 1);
                for (j, pair) in row_buf.chunks_exact(2).enumerate() {
                    even[j] = pair[0];
                    odd[j] = pair[1];
                }
                let hr = &mut h[slot * 4 * tw..(slot + 1) * 4 * tw];
                let (h0, rest) = hr.split_at_mut(tw);
                let (h1, rest) = rest.split_at_mut(tw);
                let (h2, h3) = rest.split_at_mut(tw);
                let (e0, e1, o0, o1) = (&even[..tw], &even[1..], &odd[..tw], &odd[1..]);
                for j in 0..tw {
                    h0[j] = e0[j] - e1[j];
                    h1[j] = o0[j] + e1[j];
                    h2[j] = e1[j] - o0[j];
                    h3[j] = o0[j] - o1[j];
                }
            }
            let col = i * tw;
            for b in 0..4 {
                let hb = |r: usize| &h[(slots[r] * 4 + b) * tw..(slots[r] * 4 + b + 1) * tw];
                let (r0, r1, r2, r3) = (hb(0), hb(1), hb(2), hb(3));
                let at = |a: usize| ((a * 4 + b) * c + channel) * tiles + col;
                for j in 0..tw {
                    v[at(0) + j] = r0[j] - r2[j];
                    v[at(1) + j] = r1[j] + r2[j];
                    v[at(2) + j] = r2[j] - r1[j];
                    v[at(3) + j] = r1[j] - r3[j];
                }
            }
        }
    }

    // M[xi] = U[xi] (m x c) * V[xi] (c x tiles), stored tiles x m (output channels
    // contiguous: the GEMM's wide register blocks then run along the channels, which are a
    // multiple of 64, rather than along a unit's tiles, which are not). As one product:
    // M[xi]^T (tiles x m) = V[xi]^T (tiles x c) * U[xi]^T (c x m, U's in x out layout).
    for xi in 0..16 {
        let lhs = Mat::row_major(&v[xi * c * tiles..(xi + 1) * c * tiles], tiles).transposed();
        let rhs = Mat::row_major(&u[xi * c * m..(xi + 1) * c * m], m);
        // SAFETY: lhs is tiles x c (V[xi], c x tiles floats), rhs c x m (U[xi]), and the
        // destination tiles rows of m floats inside `prod`.
        unsafe {
            gemm_mat(
                tiles,
                m,
                c,
                prod[xi * m * tiles..].as_mut_ptr(),
                m,
                false,
                lhs,
                rhs,
            )
        };
    }

    // Y = At M A per tile, across the output channels at once, into `y` (m x 2 rows x 2 * tw
    // columns per tile row); then bias, residual and ReLU on the way out, as the direct path's
    // epilogue: relu(y + bias + residual).
    let width = 2 * tw;
    y.resize(m * 2 * width, 0.0);
    for (i, row) in rows.clone().enumerate() {
        let (image, ty) = (row / plan.tiles_h, row % plan.tiles_h);
        for j in 0..tw {
            let t = i * tw + j;
            let mv = |xi: usize| &prod[(xi * tiles + t) * m..][..m];
            let ms: [&[f32]; 16] = std::array::from_fn(mv);
            for (oc, out_rows) in y.chunks_exact_mut(2 * width).enumerate() {
                let v: [f32; 16] = std::array::from_fn(|xi| ms[xi][oc]);
                // p[a] = (m[a][0] + m[a][1] + m[a][2], m[a][1] - m[a][2] - m[a][3]).
                let p = |a: usize| {
                    let (m0, m1, m2, m3) = (v[a * 4], v[a * 4 + 1], v[a * 4 + 2], v[a * 4 + 3]);
                    (m0 + m1 + m2, m1 - m2 - m3)
                };
                let (p0, p1, p2, p3) = (p(0), p(1), p(2), p(3));
                out_rows[2 * j] = p0.0 + p1.0 + p2.0;
                out_rows[2 * j + 1] = p0.1 + p1.1 + p2.1;
                out_rows[width + 2 * j] = p1.0 - p2.0 - p3.0;
                out_rows[width + 2 * j + 1] = p1.1 - p2.1 - p3.1;
            }
        }
        for oc in 0..m {
            let bias = bias.map_or(0.0, |b| b[oc]);
            for dy in 0..2 {
                let oy = 2 * ty + dy;
                if oy >= geo.out_h {
                    break;
                }
                let start = (image * m + oc) * plane_out + oy * geo.out_w;
                let row = &mut y[(oc * 2 + dy) * width..][..geo.out_w];
                match residual {
                    Some(r) => {
                        for (v, &r) in row.iter_mut().zip(&r[start..start + geo.out_w]) {
                            let sum = *v + bias + r;
                            *v = if relu { relu_nan(sum) } else { sum };
                        }
                    }
                    None => {
                        for v in row.iter_mut() {
                            let sum = *v + bias;
                            *v = if relu { relu_nan(sum) } else { sum };
                        }
                    }
                }
                // SAFETY: output row `oy` of this channel and image lies inside `out` and
                // belongs to this unit.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(start), row.len()) };
            }
        }
    }
}

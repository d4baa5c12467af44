//! The forward convolution on CPUs with AVX-512: im2col into panels of [`NR`] pixels, then an
//! own register-blocked micro-kernel ([`MR`] output channels x [`NR`] pixels per step) that
//! reads the weights where they are, so nothing but the patches is ever copied.
//!
//! Pixels are numbered across the batch (`image * out_pixels + pixel`), so small late-layer
//! images share panels instead of each padding its own. Every output element is one dot
//! product summed in the same order (depth blocks of [`KC`], in order) whichever work unit and
//! panel lane computes it: results do not depend on the thread count or the blocking.

use super::cpu_conv::{COLUMN_BUFFER_FLOATS, Conv2dGeometry, epilogue_from, im2col};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Output channels per micro-kernel call (accumulator rows).
const MR: usize = 8;
/// Pixels per panel (three 16-float vectors per accumulator row).
const NR: usize = 48;
/// Depth per micro-kernel call: a panel block of `KC x NR` floats (24 KiB) stays in L1.
const KC: usize = 128;
/// Floats of a 64-byte cache line: buffers start on one so that panel loads are aligned.
const ALIGN: usize = 16;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turn this kernel on or off (on by default where the CPU has AVX-512); off, convolutions take
/// the portable GEMM path. For tests and benchmarks.
pub(crate) fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn cpu_has_avx512() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the kernel is enabled and the CPU has AVX-512F.
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && cpu_has_avx512()
}

/// Whether [`conv2d`] handles `geo` here: AVX-512 present, the kernel enabled, and at least a
/// full micro-kernel of output channels per group (ResNeXt's narrow groups stay on the GEMM
/// path).
pub(crate) fn handles(geo: &Conv2dGeometry) -> bool {
    enabled() && geo.group_out() >= MR
}

/// A pointer to the output that work units share; each writes a disjoint block.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: units write disjoint elements (distinct group, pixel or channel ranges), and the
// buffer outlives the parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Per-thread scratch: the unit's column matrix and its output block.
#[derive(Default)]
struct Scratch {
    columns: Vec<f32>,
    product: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `buffer[..len]`, grown as needed, starting on a cache line.
fn aligned(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.resize(len + ALIGN, 0.0);
    let skip = buffer.as_ptr().align_offset(ALIGN * 4).min(ALIGN);
    &mut buffer[skip..skip + len]
}

/// How the convolution is cut into work units: groups x pixel ranges x channel blocks.
struct Plan {
    /// Pixels of one group across the batch.
    total: usize,
    /// Panels per pixel range (the last range may have fewer).
    panels_per_unit: usize,
    pixel_units: usize,
    channel_block: usize,
    channel_blocks: usize,
}

impl Plan {
    fn new(geo: &Conv2dGeometry) -> Self {
        let (m, k) = (geo.group_out(), geo.patch_len());
        let total = geo.batch * geo.out_h * geo.out_w;
        let panels = total.div_ceil(NR);
        // Patches and the output block each stay about 1 MiB (in L2).
        let fit = (COLUMN_BUFFER_FLOATS / (k * NR))
            .min(COLUMN_BUFFER_FLOATS / (m * NR))
            .max(1);
        // Several units per thread, so that unequal ones (the last pixel range is shorter)
        // still even out.
        let target = 4 * rayon::current_num_threads().max(1);
        let mut pixel_units = panels.div_ceil(fit);
        if geo.groups * pixel_units < target {
            pixel_units = panels.min(target.div_ceil(geo.groups));
        }
        let panels_per_unit = panels.div_ceil(pixel_units.max(1)).max(1);
        let pixel_units = panels.div_ceil(panels_per_unit);
        let mut channel_block = m;
        let outer = geo.groups * pixel_units;
        if outer < target {
            let blocks = target.div_ceil(outer).min(m / MR).max(1);
            channel_block = m.div_ceil(blocks).next_multiple_of(MR);
        }
        Self {
            total,
            panels_per_unit,
            pixel_units,
            channel_block,
            channel_blocks: m.div_ceil(channel_block),
        }
    }
}

/// `act(conv2d(x, weight) + bias + residual)` in NCHW, as [`super::cpu_conv::conv2d`], for a
/// geometry [`handles`] accepts.
pub(crate) fn conv2d(
    geo: &Conv2dGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    debug_assert!(handles(geo));
    let mut out = vec![0.0f32; geo.output_len()];
    if out.is_empty() {
        return out;
    }
    let plan = Plan::new(geo);
    let shared = SharedOut(out.as_mut_ptr());
    let units = geo.groups * plan.pixel_units * plan.channel_blocks;
    let run = |unit: usize| {
        let channel_block = unit % plan.channel_blocks;
        let rest = unit / plan.channel_blocks;
        let pixel_unit = rest % plan.pixel_units;
        let group = rest / plan.pixel_units;
        let start = pixel_unit * plan.panels_per_unit * NR;
        let pixels = start..(start + plan.panels_per_unit * NR).min(plan.total);
        let c0 = channel_block * plan.channel_block;
        let channels = c0..(c0 + plan.channel_block).min(geo.group_out());
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: this unit's (group, pixels, channels) block of `out` is written by no
            // other unit, and `out` has `geo.output_len()` floats.
            unsafe {
                run_unit(
                    geo,
                    scratch,
                    Unit {
                        group,
                        pixels,
                        channels,
                    },
                    x,
                    weight,
                    bias,
                    residual,
                    relu,
                    shared.ptr(),
                )
            }
        });
    };
    if units == 1 || rayon::current_num_threads() == 1 {
        (0..units).for_each(run);
    } else {
        (0..units).into_par_iter().for_each(run);
    }
    out
}

/// One work unit: output channels `channels` (within the group) of group `group` for the
/// batch-wide pixels `pixels`.
struct Unit {
    group: usize,
    pixels: std::ops::Range<usize>,
    channels: std::ops::Range<usize>,
}

/// Calls `f(image, image_pixels, offset)` for each image's share of the batch-wide `pixels`,
/// `offset` being where that share starts within `pixels`.
fn for_each_image(
    pixels_per_image: usize,
    pixels: &std::ops::Range<usize>,
    mut f: impl FnMut(usize, std::ops::Range<usize>, usize),
) {
    let mut g = pixels.start;
    while g < pixels.end {
        let image = g / pixels_per_image;
        let p0 = g % pixels_per_image;
        let p1 = pixels_per_image.min(p0 + (pixels.end - g));
        f(image, p0..p1, g - pixels.start);
        g += p1 - p0;
    }
}

/// # Safety
/// `out` must point to `geo.output_len()` floats, and no other thread may touch this unit's
/// block of them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn run_unit(
    geo: &Conv2dGeometry,
    scratch: &mut Scratch,
    unit: Unit,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    out: *mut f32,
) {
    let (m, k) = (geo.group_out(), geo.patch_len());
    let pixels_per_image = geo.out_h * geo.out_w;
    let plane_in = geo.in_h * geo.in_w;
    let n = unit.pixels.len();
    let panels = n.div_ceil(NR);

    // Patches, k x width row-major (lanes past the unit's pixels zero). The micro-kernel
    // reads each panel of NR columns in place, rows `width` apart; an odd panel count keeps
    // that stride from mapping the rows of a panel block onto few cache sets.
    let width = (panels | 1) * NR;
    let columns = aligned(&mut scratch.columns, k * width);
    for_each_image(pixels_per_image, &unit.pixels, |image, image_pixels, offset| {
        let start = (image * geo.in_channels + unit.group * geo.group_in()) * plane_in;
        im2col(
            geo,
            &x[start..start + geo.group_in() * plane_in],
            image_pixels,
            columns,
            width,
            offset,
        );
    });
    if n < panels * NR {
        for row in columns.chunks_exact_mut(width) {
            row[n..panels * NR].fill(0.0);
        }
    }

    // The product for this unit's channels, rows `width` apart. (Finishing panels straight
    // into the output from the micro-kernel measured slower: many short strided stores.)
    let rows = unit.channels.len();
    let product = aligned(&mut scratch.product, rows * width);
    let first_row = unit.group * m + unit.channels.start;
    let weights = &weight[first_row * k..(first_row + rows) * k];
    for t in 0..panels {
        for depth in (0..k).step_by(KC) {
            let kc = KC.min(k - depth);
            for r0 in (0..rows).step_by(MR) {
                let r = MR.min(rows - r0);
                // SAFETY: rows r0..r0 + r of `weights` have k floats from `depth` on (kc of
                // them read, lda k); the columns have kc rows of NR from (depth, t * NR), rows
                // `width` apart; the product tile is r rows of NR floats `width` apart.
                unsafe {
                    micro_kernel(
                        r,
                        kc,
                        weights.as_ptr().add(r0 * k + depth),
                        k,
                        columns.as_ptr().add(depth * width + t * NR),
                        width,
                        product.as_mut_ptr().add(r0 * width + t * NR),
                        width,
                        depth > 0,
                    )
                };
            }
        }
    }

    // Bias, residual and ReLU on the way to the output, image by image.
    for (row, channel) in unit.channels.clone().enumerate() {
        let channel = unit.group * m + channel;
        let values = &product[row * width..row * width + n];
        for_each_image(pixels_per_image, &unit.pixels, |image, image_pixels, offset| {
            let start = (image * geo.out_channels + channel) * pixels_per_image + image_pixels.start;
            let len = image_pixels.len();
            // SAFETY: this row segment of the output belongs to the unit.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(start), len) };
            epilogue_from(
                dst,
                &values[offset..offset + len],
                bias.map_or(0.0, |b| b[channel]),
                residual.map(|r| &r[start..start + len]),
                relu,
            );
        });
    }
}

/// `c (rows x NR, row stride ldc) (+)= a (rows x kc, row stride lda) * b (kc x NR, row stride
/// ldb)` for 1 <= rows <= MR.
///
/// # Safety
/// The CPU must have AVX-512F; the pointers must cover what the shapes address.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel(
    rows: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; `R` equals `rows`.
    unsafe {
        let f = match rows {
            1 => avx512::kernel::<1>,
            2 => avx512::kernel::<2>,
            3 => avx512::kernel::<3>,
            4 => avx512::kernel::<4>,
            5 => avx512::kernel::<5>,
            6 => avx512::kernel::<6>,
            7 => avx512::kernel::<7>,
            _ => avx512::kernel::<8>,
        };
        f(kc, a, lda, b, ldb, c, ldc, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, kc, a, lda, b, ldb, c, ldc, accumulate);
        unreachable!("handles() is false without AVX-512");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::micro_kernel`] for `R` rows: `R x 3` accumulators of 16 floats.
    ///
    /// # Safety
    /// As [`super::micro_kernel`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel<const R: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY (every pointer access below): the caller's contract.
        unsafe {
            // Each depth block is summed from zero and then added to `c` (blocked summation:
            // rounding errors grow with the block, not the whole depth).
            let mut acc = [[_mm512_setzero_ps(); 3]; R];
            let mut b = b;
            for d in 0..kc {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                let b2 = _mm512_loadu_ps(b.add(32));
                for (r, row) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*a.add(r * lda + d));
                    row[0] = _mm512_fmadd_ps(w, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(w, b1, row[1]);
                    row[2] = _mm512_fmadd_ps(w, b2, row[2]);
                }
                b = b.add(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, lane) in row.iter().enumerate() {
                    let dst = c.add(r * ldc + v * 16);
                    let sum = if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(dst), *lane)
                    } else {
                        *lane
                    };
                    _mm512_storeu_ps(dst, sum);
                }
            }
        }
    }
}

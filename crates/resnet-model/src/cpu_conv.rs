//! The CPU convolution behind [`crate::ops::conv2d_fused`] on the flex backend.
//!
//! NCHW in, NCHW out, float32. Each convolution is cut into independent work units (image,
//! group, block of output channels, block of output pixels); a unit gathers its input patches
//! into a column matrix (im2col, skipped for unstrided 1x1 convolutions, whose input already is
//! one), multiplies it by the weights with a single-threaded GEMM straight into the output
//! tensor, then adds the bias and the residual and applies the ReLU while the block is still in
//! cache. Units run on rayon's pool (the one flex uses), so both cores stay busy at batch 1 too,
//! where Burn's own kernel leaves the small late layers to one thread.

use burn::tensor::ops::ConvOptions;
use rayon::prelude::*;
use std::cell::RefCell;

/// The column buffer of one work unit holds at most about this many floats (1 MiB), so that it
/// stays in the L2 cache while the GEMM reads it.
const COLUMN_BUFFER_FLOATS: usize = 256 * 1024;

/// Blocks of output pixels are multiples of this (the GEMM kernels' column width).
const PIXEL_ALIGN: usize = 16;

/// Pixel blocks are not split below this many pixels to balance threads.
const MIN_PIXEL_BLOCK: usize = 24;

/// Output-channel blocks are not split below this many rows.
const MIN_CHANNEL_BLOCK: usize = 32;

/// Shapes and options of one 2D convolution, checked for consistency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv2dGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding before the first row and column (the end padding only shows in `out_h`/`out_w`).
    pub pad_begin: [usize; 2],
    pub dilation: [usize; 2],
    pub out_h: usize,
    pub out_w: usize,
}

impl Conv2dGeometry {
    /// The geometry of `conv2d(x, weight)` for `x: [batch, in_channels, h, w]` and `weight:
    /// [out_channels, in_channels / groups, kh, kw]`, or `None` if the shapes do not fit each
    /// other (the caller then leaves the convolution to Burn, which reports the mistake).
    pub fn new(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let [batch, in_channels, in_h, in_w] = x;
        let [out_channels, per_group, kh, kw] = weight;
        let groups = options.groups;
        if groups == 0
            || in_channels != per_group * groups
            || out_channels % groups != 0
            || out_channels == 0
            || kh == 0
            || kw == 0
        {
            return None;
        }
        let out_size = |input: usize, k: usize, dim: usize| {
            let (begin, end) = options.padding[dim];
            let span = options.dilation[dim] * (k - 1) + 1;
            let padded = input + begin + end;
            (padded >= span && options.stride[dim] > 0)
                .then(|| (padded - span) / options.stride[dim] + 1)
        };
        let out_h = out_size(in_h, kh, 0)?;
        let out_w = out_size(in_w, kw, 1)?;
        Some(Self {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            groups,
            kernel: [kh, kw],
            stride: options.stride,
            pad_begin: [options.padding[0].0, options.padding[1].0],
            dilation: options.dilation,
            out_h,
            out_w,
        })
    }

    /// Output shape `[batch, out_channels, out_h, out_w]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h, self.out_w]
    }

    fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }

    fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_h * self.out_w
    }

    /// Input channels per group.
    fn group_in(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels per group (GEMM rows).
    fn group_out(&self) -> usize {
        self.out_channels / self.groups
    }

    /// One patch: input channels of a group times kernel positions (GEMM depth).
    fn patch_len(&self) -> usize {
        self.group_in() * self.kernel[0] * self.kernel[1]
    }

    /// Whether the input planes already are the column matrix (1x1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.pad_begin == [0, 0] && {
            // No end padding either: the output has the input's size.
            self.out_h == self.in_h && self.out_w == self.in_w
        }
    }
}

/// How a convolution is cut into work units.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Output pixels per unit (the last block may be shorter).
    pixel_block: usize,
    pixel_blocks: usize,
    /// Output channels per unit, within a group.
    channel_block: usize,
    channel_blocks: usize,
}

impl Plan {
    fn new(geo: &Conv2dGeometry, threads: usize) -> Self {
        let pixels = geo.out_h * geo.out_w;
        let pixel_block = if geo.is_pointwise() {
            pixels
        } else {
            let fit = (COLUMN_BUFFER_FLOATS / geo.patch_len()).max(PIXEL_ALIGN);
            (fit / PIXEL_ALIGN * PIXEL_ALIGN).min(pixels)
        };
        let mut plan = Self {
            pixel_block,
            pixel_blocks: pixels.div_ceil(pixel_block),
            channel_block: geo.group_out(),
            channel_blocks: 1,
        };
        // With few images (batch 1 latency), make the unit count a multiple of the thread count
        // so that no thread idles at the end: more, smaller pixel blocks first (each builds
        // only its own columns), then blocks of output channels (which share the columns).
        let outer = geo.batch * geo.groups;
        if outer < 4 * threads && threads > 1 {
            let mut blocks = plan.pixel_blocks;
            while (outer * blocks) % threads != 0 && pixels / (blocks + 1) >= MIN_PIXEL_BLOCK {
                blocks += 1;
            }
            if (outer * blocks) % threads == 0 && blocks != plan.pixel_blocks {
                plan.pixel_block = pixels.div_ceil(blocks);
                plan.pixel_blocks = pixels.div_ceil(plan.pixel_block);
            }
        }
        let units = outer * plan.pixel_blocks;
        if units < threads && geo.group_out() >= 2 * MIN_CHANNEL_BLOCK {
            let blocks = threads
                .div_ceil(units)
                .min(geo.group_out() / MIN_CHANNEL_BLOCK);
            plan.channel_block = geo.group_out().div_ceil(blocks).next_multiple_of(8);
            plan.channel_blocks = geo.group_out().div_ceil(plan.channel_block);
        }
        plan
    }

    fn units(&self, geo: &Conv2dGeometry) -> usize {
        geo.batch * geo.groups * self.pixel_blocks * self.channel_blocks
    }
}

/// A pointer to the output that work units share; each writes a disjoint block.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: units write disjoint elements (distinct image, group, channel or pixel blocks), and
// the buffer outlives the parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

thread_local! {
    /// Column buffer reused by every unit run on this thread.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `act(conv2d(x, weight) + bias + residual)` in NCHW, where `act` is ReLU or the identity.
///
/// `bias` has one value per output channel; `residual` has the output's shape. Panics if a
/// slice's length does not match `geo` (the caller builds both from the same tensors).
pub(crate) fn conv2d(
    geo: &Conv2dGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), geo.input_len(), "conv2d input length");
    assert_eq!(weight.len(), geo.weight_len(), "conv2d weight length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), geo.out_channels, "conv2d bias length");
    }
    if let Some(residual) = residual {
        assert_eq!(residual.len(), geo.output_len(), "conv2d residual length");
    }
    let mut out = vec![0.0f32; geo.output_len()];
    let plan = Plan::new(geo, rayon::current_num_threads());
    let shared = SharedOut(out.as_mut_ptr());
    let run = |unit: usize| {
        let shared = shared;
        // Unit index, innermost first: pixel block, channel block, group, image.
        let pixel_block = unit % plan.pixel_blocks;
        let rest = unit / plan.pixel_blocks;
        let channel_block = rest % plan.channel_blocks;
        let rest = rest / plan.channel_blocks;
        let group = rest % geo.groups;
        let image = rest / geo.groups;
        let pixels = geo.out_h * geo.out_w;
        let p0 = pixel_block * plan.pixel_block;
        let p1 = (p0 + plan.pixel_block).min(pixels);
        let c0 = group * geo.group_out() + channel_block * plan.channel_block;
        let c1 = (c0 + plan.channel_block).min((group + 1) * geo.group_out());
        let block = Block {
            image,
            group,
            channels: c0..c1,
            pixels: p0..p1,
        };
        // SAFETY: this unit's block of `out` is written by no other unit.
        unsafe { run_unit(geo, &block, x, weight, bias, residual, relu, shared.0) };
    };
    let units = plan.units(geo);
    if units == 1 || rayon::current_num_threads() == 1 {
        (0..units).for_each(run);
    } else {
        (0..units).into_par_iter().for_each(run);
    }
    out
}

/// One work unit: output channels `channels` (absolute indices) and output pixels `pixels` of
/// one image and group.
struct Block {
    image: usize,
    group: usize,
    channels: std::ops::Range<usize>,
    pixels: std::ops::Range<usize>,
}

/// Compute one block of the output.
///
/// # Safety
/// `out` must point to `geo.output_len()` floats, and no other thread may touch this block's
/// elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn run_unit(
    geo: &Conv2dGeometry,
    block: &Block,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    out: *mut f32,
) {
    let pixels = geo.out_h * geo.out_w;
    let plane = geo.in_h * geo.in_w;
    let k = geo.patch_len();
    let m = block.channels.len();
    let n = block.pixels.len();
    let group_input = &x[(block.image * geo.in_channels + block.group * geo.group_in()) * plane..]
        [..geo.group_in() * plane];
    let lhs = &weight[block.channels.start * k..block.channels.end * k];
    let out_offset = (block.image * geo.out_channels + block.channels.start) * pixels;
    // SAFETY (both arms): `lhs` is m x k row-major; the rhs is k x n (row stride given); the
    // destination block starts at `out_offset`, has row stride `pixels`, and lies inside `out`
    // (the caller's contract makes it exclusively ours).
    if geo.is_pointwise() {
        let rhs = &group_input[block.pixels.start..];
        unsafe {
            gemm_into(
                out.add(out_offset + block.pixels.start),
                pixels,
                lhs,
                rhs,
                plane,
                m,
                n,
                k,
            )
        };
    } else {
        COLUMNS.with_borrow_mut(|columns| {
            // Every element is written by im2col; only growth needs initializing.
            columns.resize(k * n, 0.0);
            im2col(geo, group_input, block.pixels.clone(), columns);
            unsafe {
                gemm_into(
                    out.add(out_offset + block.pixels.start),
                    pixels,
                    lhs,
                    columns,
                    n,
                    m,
                    n,
                    k,
                )
            };
        });
    }
    for (row, channel) in block.channels.clone().enumerate() {
        let start = out_offset + row * pixels + block.pixels.start;
        // SAFETY: this row segment is inside our block.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.add(start), n) };
        epilogue(
            dst,
            bias.map_or(0.0, |b| b[channel]),
            residual.map(|r| &r[start..start + n]),
            relu,
        );
    }
}

/// `max(v, 0)`, NaN kept (as PyTorch's and Burn's ReLU).
#[inline]
fn relu_nan(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// `dst = act(dst + bias + residual)`.
#[inline]
fn epilogue(dst: &mut [f32], bias: f32, residual: Option<&[f32]>, relu: bool) {
    match (residual, relu) {
        (Some(r), true) => dst
            .iter_mut()
            .zip(r)
            .for_each(|(d, &r)| *d = relu_nan(*d + bias + r)),
        (Some(r), false) => dst.iter_mut().zip(r).for_each(|(d, &r)| *d += bias + r),
        (None, true) => dst.iter_mut().for_each(|d| *d = relu_nan(*d + bias)),
        (None, false) if bias != 0.0 => dst.iter_mut().for_each(|d| *d += bias),
        (None, false) => {}
    }
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) * rhs (k x n, row stride rhs_rs)`.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `n` floats `dst_rs` apart, not aliased.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    m: usize,
    n: usize,
    k: usize,
) {
    debug_assert!(lhs.len() >= m * k);
    debug_assert!(k == 0 || rhs.len() >= (k - 1) * rhs_rs + n);
    // SAFETY: the slices cover what gemm reads (checked above in debug builds, guaranteed by the
    // callers' index arithmetic); `dst` is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Gather the patches of output pixels `pixels` into `columns` (`patch_len x pixels.len()`,
/// row-major; every element is written): row `(c, ky, kx)` holds input channel `c` at kernel
/// offset `(ky, kx)` for every pixel, zero where the patch overhangs the padding.
fn im2col(
    geo: &Conv2dGeometry,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
) {
    let n = pixels.len();
    let [kh, kw] = geo.kernel;
    let [sh, sw] = geo.stride;
    let [dh, dw] = geo.dilation;
    let [ph, pw] = geo.pad_begin;
    let plane = geo.in_h * geo.in_w;
    if [sh, sw] == [1, 1] && geo.out_w == geo.in_w {
        return im2col_unstrided(geo, input, pixels, columns);
    }
    for c in 0..geo.group_in() {
        let channel = &input[c * plane..(c + 1) * plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = (c * kh + ky) * kw + kx;
                let dst = &mut columns[row * n..(row + 1) * n];
                let x_off = (kx * dw) as isize - pw as isize;
                // Output columns whose input column lies inside the image.
                let ox_lo = if x_off >= 0 {
                    0
                } else {
                    (-x_off as usize).div_ceil(sw)
                };
                let ox_hi = if (geo.in_w as isize) > x_off {
                    (((geo.in_w as isize - x_off) as usize).div_ceil(sw)).min(geo.out_w)
                } else {
                    0
                };
                let mut p = pixels.start;
                while p < pixels.end {
                    let oy = p / geo.out_w;
                    let ox0 = p % geo.out_w;
                    let ox1 = geo.out_w.min(ox0 + (pixels.end - p));
                    let iy = (oy * sh + ky * dh) as isize - ph as isize;
                    let seg = &mut dst[p - pixels.start..p - pixels.start + (ox1 - ox0)];
                    let inside = iy >= 0 && (iy as usize) < geo.in_h;
                    let lo = ox_lo.clamp(ox0, ox1);
                    let hi = ox_hi.clamp(lo, ox1);
                    if !inside || lo == hi {
                        seg.fill(0.0);
                    } else {
                        let src = &channel[iy as usize * geo.in_w..(iy as usize + 1) * geo.in_w];
                        seg[..lo - ox0].fill(0.0);
                        seg[hi - ox0..].fill(0.0);
                        let first = (lo as isize * sw as isize + x_off) as usize;
                        let out = &mut seg[lo - ox0..hi - ox0];
                        if sw == 1 {
                            out.copy_from_slice(&src[first..first + out.len()]);
                        } else {
                            for (i, o) in out.iter_mut().enumerate() {
                                *o = src[first + i * sw];
                            }
                        }
                    }
                    p += ox1 - ox0;
                }
            }
        }
    }
}

/// The larger of `a` and `b`, NaN if either is NaN (as PyTorch's max pooling).
#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if b > a || b.is_nan() { b } else { a }
}

/// Shapes and options of one 2D max pooling (floor mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pool2dGeometry {
    /// Batch times channels: the number of planes.
    pub planes: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad_begin: [usize; 2],
    pub dilation: [usize; 2],
    pub out_h: usize,
    pub out_w: usize,
}

impl Pool2dGeometry {
    /// The geometry of a max pooling of `x: [batch, channels, h, w]` with per-side `padding`
    /// `[(top, bottom), (left, right)]`, or `None` if no window fits or a padding is not
    /// smaller than its window (then every output would see only padding).
    pub fn new(
        x: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        dilation: [usize; 2],
    ) -> Option<Self> {
        let [batch, channels, in_h, in_w] = x;
        let out = |dim: usize, input: usize| {
            let (begin, end) = padding[dim];
            let span = dilation[dim] * kernel[dim].checked_sub(1)? + 1;
            let padded = input + begin + end;
            (padded >= span && stride[dim] > 0 && begin < span && end < span)
                .then(|| (padded - span) / stride[dim] + 1)
        };
        Some(Self {
            planes: batch * channels,
            in_h,
            in_w,
            kernel,
            stride,
            pad_begin: [padding[0].0, padding[1].0],
            dilation,
            out_h: out(0, in_h)?,
            out_w: out(1, in_w)?,
        })
    }
}

/// Max pooling of NCHW planes, padding ignored (as `-inf`), NaN propagated. Output planes of
/// `out_h x out_w`.
pub(crate) fn max_pool2d(geo: &Pool2dGeometry, x: &[f32]) -> Vec<f32> {
    let plane_in = geo.in_h * geo.in_w;
    let plane_out = geo.out_h * geo.out_w;
    assert_eq!(x.len(), geo.planes * plane_in, "max_pool2d input length");
    let mut out = vec![0.0f32; geo.planes * plane_out];
    if plane_out == 0 {
        return out;
    }
    let pool_plane = |(input, output): (&[f32], &mut [f32])| {
        // Vertical maximum of the window's rows, then the horizontal one over that row.
        let mut rows = vec![0.0f32; geo.in_w];
        for (oy, out_row) in output.chunks_exact_mut(geo.out_w).enumerate() {
            let mut first = true;
            for ky in 0..geo.kernel[0] {
                let iy = (oy * geo.stride[0] + ky * geo.dilation[0]) as isize
                    - geo.pad_begin[0] as isize;
                if iy < 0 || iy as usize >= geo.in_h {
                    continue;
                }
                let row = &input[iy as usize * geo.in_w..][..geo.in_w];
                if first {
                    rows.copy_from_slice(row);
                    first = false;
                } else {
                    rows.iter_mut()
                        .zip(row)
                        .for_each(|(m, &v)| *m = nan_max(*m, v));
                }
            }
            if first {
                // Every row of this window falls into the padding (possible with dilation).
                rows.fill(f32::NEG_INFINITY);
            }
            for (ox, o) in out_row.iter_mut().enumerate() {
                let mut acc = f32::NEG_INFINITY;
                for kx in 0..geo.kernel[1] {
                    let ix = (ox * geo.stride[1] + kx * geo.dilation[1]) as isize
                        - geo.pad_begin[1] as isize;
                    if ix >= 0 && (ix as usize) < geo.in_w {
                        acc = nan_max(acc, rows[ix as usize]);
                    }
                }
                *o = acc;
            }
        }
    };
    let pairs = x
        .chunks_exact(plane_in)
        .zip(out.chunks_exact_mut(plane_out));
    if geo.planes * plane_in < 1 << 14 || rayon::current_num_threads() == 1 {
        pairs.for_each(pool_plane);
    } else {
        x.par_chunks_exact(plane_in)
            .zip(out.par_chunks_exact_mut(plane_out))
            .with_min_len(4)
            .for_each(pool_plane);
    }
    out
}

/// [`im2col`] for stride 1 with the output as wide as the input (the "same" 3x3 convolutions):
/// pixel `p` of a row reads input element `p + shift` of its channel, so each row is one copy,
/// then zeros where the patch overhangs the left or right padding.
fn im2col_unstrided(
    geo: &Conv2dGeometry,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
) {
    let n = pixels.len();
    let w = geo.in_w;
    let [kh, kw] = geo.kernel;
    let [dh, dw] = geo.dilation;
    let [ph, pw] = geo.pad_begin;
    let plane = geo.in_h * w;
    // Output rows the block touches: `first_row` and the rows after it, while `< last_row`.
    let first_row = pixels.start / w;
    let last_row = pixels.end.div_ceil(w);
    for ky in 0..kh {
        for kx in 0..kw {
            let x_off = (kx * dw) as isize - pw as isize;
            let shift = (ky * dh) as isize * w as isize - (ph * w) as isize + x_off;
            // Block positions whose source index lies inside the plane.
            let start = pixels.start as isize + shift;
            let lo = (-start).clamp(0, n as isize) as usize;
            let hi = (plane as isize - start).clamp(lo as isize, n as isize) as usize;
            // Output columns whose input column overhangs the left or right edge.
            let left = x_off.clamp(-(w as isize), 0).unsigned_abs();
            let right = x_off.clamp(0, w as isize) as usize;
            for c in 0..geo.group_in() {
                let row = (c * kh + ky) * kw + kx;
                let dst = &mut columns[row * n..(row + 1) * n];
                let channel = &input[c * plane..(c + 1) * plane];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                if lo < hi {
                    let src = (start + lo as isize) as usize;
                    dst[lo..hi].copy_from_slice(&channel[src..src + (hi - lo)]);
                }
                if left == 0 && right == 0 {
                    continue;
                }
                for oy in first_row..last_row {
                    let row_start = oy * w;
                    let zero = |range: std::ops::Range<usize>, dst: &mut [f32]| {
                        let a = range.start.max(pixels.start);
                        let b = range.end.min(pixels.end);
                        if a < b {
                            dst[a - pixels.start..b - pixels.start].fill(0.0);
                        }
                    };
                    zero(row_start..row_start + left, dst);
                    zero(row_start + w - right..row_start + w, dst);
                }
            }
        }
    }
}

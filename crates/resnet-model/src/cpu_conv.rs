//! resnet-rs's CPU kernels behind [`crate::ops`] on the flex backend: convolution (forward,
//! and the input and weight gradients for training) and max pooling.
//!
//! NCHW in, NCHW out, float32. Each convolution is cut into independent work units (image,
//! group, block of output channels, block of output pixels; for small images, a block of output
//! channels over the whole batch side by side, or runs of several images where the batch is
//! large); a unit gathers its input patches into a column matrix (im2col,
//! skipped for unstrided 1x1 convolutions, whose input already is one), multiplies it by the
//! weights with a single-threaded GEMM (the `gemm` crate, AVX2 or AVX-512 picked at run time)
//! straight into the output tensor, then adds the bias and the residual and applies the ReLU
//! while the block is still in cache. Units run on rayon's pool (the one flex uses), so both
//! cores stay busy at batch 1 too, where Burn's own kernel leaves the small late layers to one
//! thread. The backward passes reuse the same pieces: `W^T * dY` then col2im for the input
//! gradient, `dY * columns^T` summed over fixed parts of the batch for the weight gradient (so
//! that no result depends on the thread count). The large 3x3 stride-1 convolutions go to
//! `cpu_winograd` instead (forward only; their gradients use the direct pieces here).

use crate::cpu_winograd::WeightOwner;
use burn::tensor::ops::ConvOptions;
use rayon::prelude::*;
use std::cell::RefCell;

/// The column buffer of one work unit holds at most about this many floats (1 MiB), so that it
/// stays in the L2 cache while the GEMM reads it.
const COLUMN_BUFFER_FLOATS: usize = 256 * 1024;

/// Blocks of output pixels are multiples of this (the GEMM kernels' column width).
const PIXEL_ALIGN: usize = 16;

/// With few images, a convolution is cut into a multiple of this many work units, so that 1, 2
/// or 4 threads share them evenly. A constant rather than the thread count: the blocking
/// decides the GEMMs' summation order, and results must not depend on the thread count.
pub(crate) const BALANCED_UNITS: usize = 4;

/// Pixel blocks are not split below this many pixels to balance threads.
const MIN_PIXEL_BLOCK: usize = 24;

/// Images with fewer output pixels than half this are batched side by side into one GEMM of
/// at least this many columns (training at 32x32 reaches 4x4 maps, where one image per GEMM
/// would repack the weights for 16 columns).
const MIN_BATCHED_COLUMNS: usize = 256;

/// Output-channel blocks are not split below this many rows.
const MIN_CHANNEL_BLOCK: usize = 32;

/// [`conv2d_whole_batch`] takes small images whose whole batch of patches fits this many
/// floats (8 MiB; ResNet-50's largest at batch 8, the 7x7 stage's 3x3 stride-2 convolution,
/// has 1.8 M).
const WHOLE_BATCH_COLUMN_FLOATS: usize = 2 << 20;

/// Output channels per work unit of [`conv2d_whole_batch`] at least.
const MIN_WHOLE_BATCH_CHANNELS: usize = 128;

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

    pub(crate) fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }

    pub(crate) fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    pub(crate) fn output_len(&self) -> usize {
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
    fn new(geo: &Conv2dGeometry) -> Self {
        let threads = BALANCED_UNITS;
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
        // With few images (batch 1 latency), make the unit count a multiple of BALANCED_UNITS
        // so that no thread idles at the end: more, smaller pixel blocks first (each builds
        // only its own columns), then blocks of output channels (which share the columns).
        let outer = geo.batch * geo.groups;
        if outer < 4 * threads {
            let mut blocks = plan.pixel_blocks;
            while !(outer * blocks).is_multiple_of(threads)
                && pixels / (blocks + 1) >= MIN_PIXEL_BLOCK
            {
                blocks += 1;
            }
            if (outer * blocks).is_multiple_of(threads) && blocks != plan.pixel_blocks {
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
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: units write disjoint elements (distinct image, group, channel or pixel blocks), and
// the buffer outlives the parallel loop that uses the pointer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the pointer).
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Column buffer reused by every unit run on this thread.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The whole batch's column buffer of [`conv2d_whole_batch`], kept by the calling thread.
    static BATCH_COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A work unit's GEMM result in [`conv2d_whole_batch`].
    static PRODUCT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `act(conv2d(x, weight) + bias + residual)` in NCHW, where `act` is ReLU or the identity.
///
/// `bias` has one value per output channel; `residual` has the output's shape. `owner`, where
/// given, is the storage `weight` is exactly (see [`WeightOwner`]): the Winograd path then
/// keeps the weights' transform for later calls. Panics if a slice's length does not match
/// `geo` (the caller builds both from the same tensors).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    geo: &Conv2dGeometry,
    x: &[f32],
    weight: &[f32],
    owner: Option<&WeightOwner>,
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
    // Winograd where it applies, unless an output came out NaN or infinite there: then the
    // direct path below recomputes it (and gives NaN and infinity their direct positions).
    if let Some(out) = crate::cpu_winograd::Plan::new(geo).and_then(|plan| {
        crate::cpu_winograd::conv2d(geo, &plan, x, weight, owner, bias, residual, relu)
    }) {
        return out;
    }
    let len = geo.output_len();
    let pixels = geo.out_h * geo.out_w;
    // Small images go side by side: the whole batch where its patches fit, else runs of
    // images, at least BALANCED_UNITS of them where the batch allows (ResNet-50's 7x7 stage at
    // batch 8 as runs of 5 + 3 images kept one of two threads idle a quarter of the time).
    let images_per_unit = MIN_BATCHED_COLUMNS
        .checked_div(pixels)
        .map_or(1, |images| images.min(geo.batch.div_ceil(BALANCED_UNITS)));
    if images_per_unit > 1 && len > 0 {
        if geo.groups == 1 && geo.patch_len() * geo.batch * pixels <= WHOLE_BATCH_COLUMN_FLOATS {
            // Not zeroed: the units write every (image, channel) row.
            let mut out: Vec<f32> = Vec::with_capacity(len);
            // SAFETY: `out` has room for the output, which only this call touches.
            unsafe { conv2d_whole_batch(geo, x, weight, bias, residual, relu, out.as_mut_ptr()) };
            // SAFETY: conv2d_whole_batch has written all `len` elements.
            unsafe { out.set_len(len) };
            return out;
        }
        let mut out = vec![0.0f32; len];
        conv2d_image_runs(
            geo,
            images_per_unit,
            x,
            weight,
            bias,
            residual,
            relu,
            &mut out,
        );
        return out;
    }
    let plan = Plan::new(geo);
    // Not zeroed: the units' blocks tile the output, and each GEMM overwrites its block
    // without reading it (zeroing first cost a memset as long as the convolution's own output
    // writes, 2-3% of ResNet-50).
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedOut(out.as_mut_ptr());
    let run = |unit: usize| {
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
        unsafe { run_unit(geo, &block, x, weight, bias, residual, relu, shared.ptr()) };
    };
    let units = plan.units(geo);
    if units == 1 || rayon::current_num_threads() == 1 {
        (0..units).for_each(run);
    } else {
        (0..units).into_par_iter().for_each(run);
    }
    // SAFETY: every unit has run, and their blocks cover all `len` elements (images x groups
    // x channel blocks x pixel blocks), each written by its GEMM before anything reads it.
    unsafe { out.set_len(len) };
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
/// `out` must be valid for writes of `geo.output_len()` floats (this block's may be
/// uninitialized: the GEMM writes them before the epilogue reads them), and no other thread
/// may touch this block's elements during the call.
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
            im2col(geo, group_input, block.pixels.clone(), columns, n, 0);
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
pub(crate) fn relu_nan(v: f32) -> f32 {
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
/// `dst` must be valid for writes of `m` rows of `n` floats `dst_rs` apart, not aliased. They
/// are overwritten without being read (so they may be uninitialized).
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

/// Gather the patches of output pixels `pixels` into `columns`, a `patch_len`-row matrix with
/// rows `row_stride` apart, from column `offset` on (every element of that range is written):
/// row `(c, ky, kx)` holds input channel `c` at kernel offset `(ky, kx)` for every pixel, zero
/// where the patch overhangs the padding.
fn im2col(
    geo: &Conv2dGeometry,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
    row_stride: usize,
    offset: usize,
) {
    if geo.stride == [1, 1] && geo.out_w == geo.in_w {
        return im2col_unstrided(geo, input, pixels, columns, row_stride, offset);
    }
    let n = pixels.len();
    let [kh, kw] = geo.kernel;
    let sw = geo.stride[1];
    let plane = geo.in_h * geo.in_w;
    for c in 0..geo.group_in() {
        let channel = &input[c * plane..(c + 1) * plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = (c * kh + ky) * kw + kx;
                let dst = &mut columns[row * row_stride + offset..][..n];
                for_each_segment(geo, &pixels, ky, kx, |seg| {
                    dst[seg.block.start..seg.valid.start].fill(0.0);
                    dst[seg.valid.end..seg.block.end].fill(0.0);
                    let out = &mut dst[seg.valid];
                    if sw == 1 {
                        out.copy_from_slice(&channel[seg.source..seg.source + out.len()]);
                    } else if sw == 2 {
                        gather_stride2(out, &channel[seg.source..]);
                    } else if !out.is_empty() {
                        let span = &channel[seg.source..seg.source + (out.len() - 1) * sw + 1];
                        out.iter_mut()
                            .zip(span.iter().step_by(sw))
                            .for_each(|(o, &v)| *o = v);
                    }
                });
            }
        }
    }
}

/// `out[i] = src[2 * i]` for every `i` of `out` (stride-2 im2col rows). Written with an index
/// into a slice cut to length first, so that the bounds checks go and the loop vectorizes: the
/// `step_by(2)` iterator of the general stride did not, and was 3x slower.
#[inline]
#[allow(clippy::needless_range_loop)] // the index form is what vectorizes
fn gather_stride2(out: &mut [f32], src: &[f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    let src = &src[..2 * n - 1];
    for i in 0..n {
        out[i] = src[2 * i];
    }
}

/// `dst[2 * i] += values[i]` for every `i` of `values`, the transpose of [`gather_stride2`].
#[inline]
#[allow(clippy::needless_range_loop)] // as in gather_stride2
fn scatter_add_stride2(dst: &mut [f32], values: &[f32]) {
    let n = values.len();
    if n == 0 {
        return;
    }
    let dst = &mut dst[..2 * n - 1];
    for i in 0..n {
        dst[2 * i] += values[i];
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
    // ResNet's stem pool (3 wide, stride 2, one column of padding on the left) has a
    // vectorized horizontal pass.
    let stem_windows =
        geo.kernel[1] == 3 && geo.stride[1] == 2 && geo.dilation[1] == 1 && geo.pad_begin[1] == 1;
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
            if stem_windows {
                max3_stride2(geo, &rows, out_row);
                continue;
            }
            for (ox, o) in out_row.iter_mut().enumerate() {
                *o = window_max(geo, &rows, ox);
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

/// The horizontal pass of [`max_pool2d`] for window `ox` of a row (the vertical maxima):
/// the maximum over the window's columns inside the row, left to right from `-inf`.
#[inline]
fn window_max(geo: &Pool2dGeometry, row: &[f32], ox: usize) -> f32 {
    let mut acc = f32::NEG_INFINITY;
    for kx in 0..geo.kernel[1] {
        let ix = (ox * geo.stride[1] + kx * geo.dilation[1]) as isize - geo.pad_begin[1] as isize;
        if ix >= 0 && (ix as usize) < row.len() {
            acc = nan_max(acc, row[ix as usize]);
        }
    }
    acc
}

/// The horizontal pass of [`max_pool2d`] for windows 3 wide, stride 2, starting one column left
/// of the row (`geo`'s, checked by the caller): `out[ox]` is the maximum of
/// `row[2 ox - 1..=2 ox + 1]`, taken in [`window_max`]'s order so that the bits are the same,
/// NaN included. The windows fully inside the row run as an index loop that vectorizes (4.4x
/// faster than the generic pass on a 112-column row, standalone); the edges go to
/// [`window_max`].
#[allow(clippy::needless_range_loop)] // the index form is what vectorizes
fn max3_stride2(geo: &Pool2dGeometry, row: &[f32], out: &mut [f32]) {
    let (w, n) = (row.len(), out.len());
    // Windows 1..inner lie inside the row (2 ox + 1 < w); max(-inf, v) is v, bit for bit.
    let inner = (w / 2).min(n);
    if inner <= 1 {
        for ox in 0..n {
            out[ox] = window_max(geo, row, ox);
        }
        return;
    }
    out[0] = window_max(geo, row, 0);
    for ox in inner..n {
        out[ox] = window_max(geo, row, ox);
    }
    let (row, out) = (&row[..2 * inner], &mut out[..inner]);
    for ox in 1..inner {
        out[ox] = nan_max(nan_max(row[2 * ox - 1], row[2 * ox]), row[2 * ox + 1]);
    }
}

/// [`im2col`] for stride 1 with the output as wide as the input (the "same" 3x3 convolutions):
/// pixel `p` of a row reads input element `p + shift` of its channel, so each row is one copy,
/// then zeros where the patch overhangs the left or right padding.
fn im2col_unstrided(
    geo: &Conv2dGeometry,
    input: &[f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
    row_stride: usize,
    offset: usize,
) {
    let n = pixels.len();
    let [kh, kw] = geo.kernel;
    let plane = geo.in_h * geo.in_w;
    for ky in 0..kh {
        for kx in 0..kw {
            let run = UnstridedRun::new(geo, &pixels, ky, kx);
            for c in 0..geo.group_in() {
                let row = (c * kh + ky) * kw + kx;
                let dst = &mut columns[row * row_stride + offset..][..n];
                let channel = &input[c * plane..(c + 1) * plane];
                let inside = run.inside.clone();
                dst[..inside.start].fill(0.0);
                dst[inside.end..].fill(0.0);
                if !inside.is_empty() {
                    let source = run.source();
                    dst[inside.clone()].copy_from_slice(&channel[source..source + inside.len()]);
                }
                run.zero_overhang(geo, &pixels, dst);
            }
        }
    }
}

/// Where one kernel offset reads for a block of output pixels when the stride is 1 and the
/// output is as wide as the input: pixel `p` reads input element `p + shift` of its channel.
struct UnstridedRun {
    /// `pixels.start + shift`: the element the block's first pixel reads (may lie outside).
    start: isize,
    /// Block positions whose element lies inside the plane.
    inside: std::ops::Range<usize>,
    /// Output columns, at the left and at the right of each row, whose patch element overhangs
    /// the padding (and so reads a neighbouring row's element instead).
    left: usize,
    right: usize,
}

impl UnstridedRun {
    fn new(geo: &Conv2dGeometry, pixels: &std::ops::Range<usize>, ky: usize, kx: usize) -> Self {
        let w = geo.in_w;
        let x_off = (kx * geo.dilation[1]) as isize - geo.pad_begin[1] as isize;
        let shift =
            (ky * geo.dilation[0]) as isize * w as isize - (geo.pad_begin[0] * w) as isize + x_off;
        let n = pixels.len() as isize;
        let start = pixels.start as isize + shift;
        let lo = (-start).clamp(0, n) as usize;
        let hi = ((geo.in_h * w) as isize - start).clamp(lo as isize, n) as usize;
        Self {
            start,
            inside: lo..hi,
            left: x_off.clamp(-(w as isize), 0).unsigned_abs(),
            right: x_off.clamp(0, w as isize) as usize,
        }
    }

    /// The element read by the first pixel of `inside` (which must not be empty).
    fn source(&self) -> usize {
        (self.start + self.inside.start as isize) as usize
    }

    /// Zero, in `values` (this offset's row of the block), the pixels whose patch element
    /// overhangs the left or right padding.
    fn zero_overhang(
        &self,
        geo: &Conv2dGeometry,
        pixels: &std::ops::Range<usize>,
        values: &mut [f32],
    ) {
        if self.left == 0 && self.right == 0 {
            return;
        }
        let w = geo.in_w;
        for oy in pixels.start / w..pixels.end.div_ceil(w) {
            let row_start = oy * w;
            for range in [
                row_start..row_start + self.left,
                row_start + w - self.right..row_start + w,
            ] {
                let a = range.start.max(pixels.start);
                let b = range.end.min(pixels.end);
                if a < b {
                    values[a - pixels.start..b - pixels.start].fill(0.0);
                }
            }
        }
    }
}

/// Add `columns` (laid out as [`im2col`] builds them: rows `row_stride` apart, this range's
/// pixels from column `offset` on) back onto the input positions they were gathered from, in
/// `dx` (the group's input channels of one image): the adjoint of im2col, for the input
/// gradient.
fn col2im_add(
    geo: &Conv2dGeometry,
    dx: &mut [f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
    row_stride: usize,
    offset: usize,
) {
    if geo.stride == [1, 1] && geo.out_w == geo.in_w {
        return col2im_add_unstrided(geo, dx, pixels, columns, row_stride, offset);
    }
    let n = pixels.len();
    let [kh, kw] = geo.kernel;
    let sw = geo.stride[1];
    let plane = geo.in_h * geo.in_w;
    for c in 0..geo.group_in() {
        let channel = &mut dx[c * plane..(c + 1) * plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let row = (c * kh + ky) * kw + kx;
                let src = &columns[row * row_stride + offset..][..n];
                for_each_segment(geo, &pixels, ky, kx, |seg| {
                    let values = &src[seg.valid];
                    if sw == 1 {
                        channel[seg.source..seg.source + values.len()]
                            .iter_mut()
                            .zip(values)
                            .for_each(|(d, &v)| *d += v);
                    } else if sw == 2 {
                        scatter_add_stride2(&mut channel[seg.source..], values);
                    } else {
                        for (i, &v) in values.iter().enumerate() {
                            channel[seg.source + i * sw] += v;
                        }
                    }
                });
            }
        }
    }
}

/// A run of output pixels on one output row, for one kernel offset: `block` is its range
/// within the pixel block, `valid` (inside `block`) the pixels whose patch element lies inside
/// the image; those read input elements `source`, `source + stride`, ... of their channel.
struct Segment {
    block: std::ops::Range<usize>,
    valid: std::ops::Range<usize>,
    source: usize,
}

/// Calls `f` with every [`Segment`] of the output pixels `pixels` for kernel offset `(ky, kx)`,
/// in order: the index arithmetic shared by [`im2col`] and [`col2im_add`].
fn for_each_segment(
    geo: &Conv2dGeometry,
    pixels: &std::ops::Range<usize>,
    ky: usize,
    kx: usize,
    mut f: impl FnMut(Segment),
) {
    let [sh, sw] = geo.stride;
    let [dh, dw] = geo.dilation;
    let [ph, pw] = geo.pad_begin;
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
        let lo = ox_lo.clamp(ox0, ox1);
        let hi = ox_hi.clamp(lo, ox1);
        let base = p - pixels.start;
        let (valid, source) = if iy >= 0 && (iy as usize) < geo.in_h && lo < hi {
            let first = (lo as isize * sw as isize + x_off) as usize;
            (
                base + lo - ox0..base + hi - ox0,
                iy as usize * geo.in_w + first,
            )
        } else {
            (base..base, 0)
        };
        f(Segment {
            block: base..base + (ox1 - ox0),
            valid,
            source,
        });
        p += ox1 - ox0;
    }
}

/// A matrix operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl Mat {
    pub(crate) fn row_major(data: &[f32], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }

    pub(crate) fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m x n, row stride dst_rs) (+)= lhs (m x k) * rhs (k x n)`, single-threaded.
///
/// # Safety
/// `lhs` and `rhs` must be valid for reads of every element their strides address for these
/// sizes; `dst` for writes of `m` rows of `n` floats `dst_rs` apart, not aliased.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_mat(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Pixels per column block of a backward pass: the column buffer stays about 1 MiB, but the
/// GEMMs get at least [`MIN_BATCHED_COLUMNS`] columns (several small images per block).
fn backward_block(geo: &Conv2dGeometry) -> usize {
    (COLUMN_BUFFER_FLOATS / geo.patch_len()).max(MIN_BATCHED_COLUMNS)
}

/// Gradient of `conv2d(x, weight)` (no bias) with respect to `x`, given the output gradient
/// `grad` (NCHW, the output's shape).
///
/// Work units are runs of whole images (one image, cut into pixel blocks, when images are
/// large; several per block when they are small, so that each GEMM has enough columns); each
/// unit owns its images' part of the result, so the result does not depend on the thread count.
pub(crate) fn conv2d_backward_input(
    geo: &Conv2dGeometry,
    weight: &[f32],
    grad: &[f32],
) -> Vec<f32> {
    assert_eq!(weight.len(), geo.weight_len(), "conv2d weight length");
    assert_eq!(grad.len(), geo.output_len(), "conv2d gradient length");
    let mut dx = vec![0.0f32; geo.input_len()];
    let plane_in = geo.in_h * geo.in_w;
    let pixels = geo.out_h * geo.out_w;
    let (m, k) = (geo.group_out(), geo.patch_len());
    let image_len = geo.in_channels * plane_in;
    if image_len == 0 || pixels == 0 {
        return dx;
    }
    let block = backward_block(geo);
    let images_per_unit = (block / pixels).max(1);
    let run = |(unit, dx_unit): (usize, &mut [f32])| {
        let first = unit * images_per_unit;
        let count = dx_unit.len() / image_len;
        let mut dy_buf = Vec::new();
        COLUMNS.with_borrow_mut(|columns| {
            for group in 0..geo.groups {
                // W_g^T: k x m.
                let w_t = Mat::row_major(&weight[group * m * k..][..m * k], k).transposed();
                let dy_of = |image: usize| {
                    &grad[(image * geo.out_channels + group * m) * pixels..][..m * pixels]
                };
                let dx_of = |i: usize| -> std::ops::Range<usize> {
                    let start = i * image_len + group * geo.group_in() * plane_in;
                    start..start + geo.group_in() * plane_in
                };
                if count == 1 {
                    let dy = dy_of(first);
                    let dx_g = &mut dx_unit[dx_of(0)];
                    if geo.is_pointwise() {
                        // SAFETY: w_t is k x m inside `weight`; dy is m x pixels; dx_g is
                        // k x pixels (k = group_in for 1x1) and exclusively ours.
                        unsafe {
                            gemm_mat(
                                k,
                                pixels,
                                m,
                                dx_g.as_mut_ptr(),
                                pixels,
                                false,
                                w_t,
                                Mat::row_major(dy, pixels),
                            )
                        };
                        continue;
                    }
                    for p0 in (0..pixels).step_by(block) {
                        let p1 = (p0 + block).min(pixels);
                        let n = p1 - p0;
                        columns.resize(k * n, 0.0);
                        let dy_block = Mat {
                            ptr: dy[p0..].as_ptr(),
                            rs: pixels,
                            cs: 1,
                        };
                        // SAFETY: columns holds k x n; dy_block is m x n inside dy.
                        unsafe { gemm_mat(k, n, m, columns.as_mut_ptr(), n, false, w_t, dy_block) };
                        col2im_add(geo, dx_g, p0..p1, columns, n, 0);
                    }
                    continue;
                }
                // Several small images: their output gradients side by side, one GEMM.
                let n = count * pixels;
                dy_buf.resize(m * n, 0.0);
                for i in 0..count {
                    let dy = dy_of(first + i);
                    for row in 0..m {
                        dy_buf[row * n + i * pixels..][..pixels]
                            .copy_from_slice(&dy[row * pixels..(row + 1) * pixels]);
                    }
                }
                columns.resize(k * n, 0.0);
                // SAFETY: columns holds k x n; dy_buf is m x n.
                unsafe {
                    gemm_mat(
                        k,
                        n,
                        m,
                        columns.as_mut_ptr(),
                        n,
                        false,
                        w_t,
                        Mat::row_major(&dy_buf, n),
                    )
                };
                for i in 0..count {
                    let range = dx_of(i);
                    col2im_add(geo, &mut dx_unit[range], 0..pixels, columns, n, i * pixels);
                }
            }
        });
    };
    let chunk = images_per_unit * image_len;
    if geo.batch <= images_per_unit || rayon::current_num_threads() == 1 {
        dx.chunks_mut(chunk).enumerate().for_each(run);
    } else {
        dx.par_chunks_mut(chunk).enumerate().for_each(run);
    }
    dx
}

/// Gradient of `conv2d(x, weight)` (no bias) with respect to `weight`, given the output
/// gradient `grad`.
///
/// The pixels of all images form one axis, cut into column blocks (several images per block
/// when the images are small, so that each GEMM has some depth); the blocks are split into a
/// fixed number of parts summed in parallel, then in order, so the result does not depend on
/// the thread count.
pub(crate) fn conv2d_backward_weight(geo: &Conv2dGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    const PARTS: usize = 4;
    assert_eq!(x.len(), geo.input_len(), "conv2d input length");
    assert_eq!(grad.len(), geo.output_len(), "conv2d gradient length");
    let (m, k) = (geo.group_out(), geo.patch_len());
    let pixels = geo.out_h * geo.out_w;
    let total = geo.batch * pixels;
    let weight_len = geo.weight_len();
    if total == 0 || weight_len == 0 {
        return vec![0.0; weight_len];
    }
    let block = backward_block(geo);
    let blocks = total.div_ceil(block);
    let parts = blocks.min(PARTS);
    let plane_in = geo.in_h * geo.in_w;
    let part = |part: usize| -> Vec<f32> {
        let mut dw = vec![0.0f32; weight_len];
        let mut dy_buf = Vec::new();
        COLUMNS.with_borrow_mut(|columns| {
            for b in (part * blocks / parts)..((part + 1) * blocks / parts) {
                let t0 = b * block;
                let t1 = (t0 + block).min(total);
                let n = t1 - t0;
                columns.resize(k * n, 0.0);
                dy_buf.resize(m * n, 0.0);
                for group in 0..geo.groups {
                    // Gather this block's patches and output gradients, image by image.
                    let mut t = t0;
                    while t < t1 {
                        let image = t / pixels;
                        let p0 = t - image * pixels;
                        let p1 = (t1 - image * pixels).min(pixels);
                        let input = &x
                            [(image * geo.in_channels + group * geo.group_in()) * plane_in..]
                            [..geo.group_in() * plane_in];
                        im2col(geo, input, p0..p1, columns, n, t - t0);
                        let dy =
                            &grad[(image * geo.out_channels + group * m) * pixels..][..m * pixels];
                        for row in 0..m {
                            dy_buf[row * n + (t - t0)..][..p1 - p0]
                                .copy_from_slice(&dy[row * pixels + p0..row * pixels + p1]);
                        }
                        t += p1 - p0;
                    }
                    // dW_g (m x k) += dY (m x n) * columns^T (n x k).
                    let cols_t = Mat::row_major(&columns[..k * n], n).transposed();
                    // SAFETY: dw's group block is m x k; dy_buf m x n; cols_t n x k.
                    unsafe {
                        gemm_mat(
                            m,
                            k,
                            n,
                            dw[group * m * k..].as_mut_ptr(),
                            k,
                            true,
                            Mat::row_major(&dy_buf, n),
                            cols_t,
                        )
                    };
                }
            }
        });
        dw
    };
    let partials: Vec<Vec<f32>> = if parts == 1 || rayon::current_num_threads() == 1 {
        (0..parts).map(part).collect()
    } else {
        (0..parts).into_par_iter().map(part).collect()
    };
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0.0; weight_len]);
    for partial in partials {
        dw.iter_mut().zip(&partial).for_each(|(a, b)| *a += b);
    }
    dw
}

/// [`conv2d`] for small images (ungrouped) whose whole batch of patches fits
/// [`WHOLE_BATCH_COLUMN_FLOATS`]: the patches of every image are gathered side by side once (in
/// parallel over input channels), then each work unit multiplies a block of output channels'
/// weights by all of them in one GEMM and hands its rows to the images with the bias, residual
/// and ReLU. Against runs of images that each take every output channel
/// ([`conv2d_image_runs`]), the weights are read once rather than once per run, and the GEMMs
/// run along more pixels: ResNet-50's 7x7 stage at batch 8 had runs of 98, 64 + 34 in vector
/// blocks of 64 and 48 pixels.
///
/// # Safety
/// `out` must be valid for writes of `geo.output_len()` floats (possibly uninitialized: each is
/// written once), which nothing else reads or writes during the call.
unsafe fn conv2d_whole_batch(
    geo: &Conv2dGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    out: *mut f32,
) {
    debug_assert_eq!(geo.groups, 1);
    let pixels = geo.out_h * geo.out_w;
    let plane_in = geo.in_h * geo.in_w;
    let (m, k) = (geo.out_channels, geo.patch_len());
    let n = geo.batch * pixels;
    let taps = geo.kernel[0] * geo.kernel[1];
    let blocks = (m / MIN_WHOLE_BATCH_CHANNELS).clamp(1, 2 * BALANCED_UNITS);
    let block = m.div_ceil(blocks);
    let shared = SharedOut(out);
    // Taken out of the thread-local rather than borrowed in place: while this thread waits
    // for the parallel loops below, rayon may run another task on it that convolves too.
    let mut buffer = BATCH_COLUMNS.take();
    // Every element is written by im2col; only growth needs initializing.
    buffer.resize(k * n, 0.0);
    {
        let columns = &mut buffer[..k * n];
        let channels_per_task = geo.in_channels.div_ceil(4 * BALANCED_UNITS);
        columns
            .par_chunks_mut(channels_per_task * taps * n)
            .enumerate()
            .for_each(|(task, rows)| {
                let first = task * channels_per_task;
                let count = rows.len() / (taps * n);
                // The same convolution over these input channels only: its patch rows are
                // this task's rows of the whole one.
                let part = Conv2dGeometry {
                    in_channels: count,
                    ..*geo
                };
                for image in 0..geo.batch {
                    let start = (image * geo.in_channels + first) * plane_in;
                    let input = &x[start..start + count * plane_in];
                    im2col(&part, input, 0..pixels, rows, n, image * pixels);
                }
            });
        let columns = &*columns;
        (0..blocks).into_par_iter().for_each(|unit| {
            let channels = unit * block..((unit + 1) * block).min(m);
            let rows = channels.len();
            PRODUCT.with_borrow_mut(|product| {
                product.resize(rows * n, 0.0);
                let lhs = Mat::row_major(&weight[channels.start * k..channels.end * k], k);
                // SAFETY: product is rows x n, lhs rows x k, columns k x n.
                unsafe {
                    gemm_mat(
                        rows,
                        n,
                        k,
                        product.as_mut_ptr(),
                        n,
                        false,
                        lhs,
                        Mat::row_major(columns, n),
                    )
                };
                for (row, channel) in channels.enumerate() {
                    for image in 0..geo.batch {
                        let start = (image * m + channel) * pixels;
                        let src = &product[row * n + image * pixels..][..pixels];
                        // SAFETY: this channel's row of this image lies inside `out`, only
                        // this unit (the one holding the channel) writes it, and the copy
                        // initializes it before the slice is made.
                        let dst = unsafe {
                            let dst = shared.ptr().add(start);
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, pixels);
                            std::slice::from_raw_parts_mut(dst, pixels)
                        };
                        epilogue(
                            dst,
                            bias.map_or(0.0, |b| b[channel]),
                            residual.map(|r| &r[start..start + pixels]),
                            relu,
                        );
                    }
                }
            });
        });
    }
    BATCH_COLUMNS.set(buffer);
}

/// [`conv2d`] for small images: each work unit takes a run of `images_per_unit` images, gathers
/// their patches side by side and multiplies them by each group's weights in one GEMM, then
/// scatters the result to the images with the bias, residual and ReLU.
#[allow(clippy::too_many_arguments)]
fn conv2d_image_runs(
    geo: &Conv2dGeometry,
    images_per_unit: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
) {
    let pixels = geo.out_h * geo.out_w;
    let plane_in = geo.in_h * geo.in_w;
    let (m, k) = (geo.group_out(), geo.patch_len());
    let image_out = geo.out_channels * pixels;
    let run = |(unit, out_run): (usize, &mut [f32])| {
        let first = unit * images_per_unit;
        let count = out_run.len() / image_out;
        let n = count * pixels;
        let mut product = vec![0.0f32; m * n];
        COLUMNS.with_borrow_mut(|columns| {
            columns.resize(k * n, 0.0);
            for group in 0..geo.groups {
                for i in 0..count {
                    let start = ((first + i) * geo.in_channels + group * geo.group_in()) * plane_in;
                    let input = &x[start..start + geo.group_in() * plane_in];
                    im2col(geo, input, 0..pixels, columns, n, i * pixels);
                }
                let lhs = Mat::row_major(&weight[group * m * k..][..m * k], k);
                // SAFETY: product is m x n; lhs m x k; columns k x n.
                unsafe {
                    gemm_mat(
                        m,
                        n,
                        k,
                        product.as_mut_ptr(),
                        n,
                        false,
                        lhs,
                        Mat::row_major(&columns[..k * n], n),
                    )
                };
                for i in 0..count {
                    for row in 0..m {
                        let channel = group * m + row;
                        let local = i * image_out + channel * pixels;
                        let dst = &mut out_run[local..local + pixels];
                        dst.copy_from_slice(&product[row * n + i * pixels..][..pixels]);
                        let global = first * image_out + local;
                        epilogue(
                            dst,
                            bias.map_or(0.0, |b| b[channel]),
                            residual.map(|r| &r[global..global + pixels]),
                            relu,
                        );
                    }
                }
            }
        });
    };
    let chunk = images_per_unit * image_out;
    if geo.batch <= images_per_unit || rayon::current_num_threads() == 1 {
        out.chunks_mut(chunk).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(run);
    }
}

/// [`col2im_add`] for stride 1 with the output as wide as the input: the entries that fell on
/// the left or right padding are zeroed in `columns`, then each row is one contiguous add
/// (pixel `p` came from input element `p + shift`).
fn col2im_add_unstrided(
    geo: &Conv2dGeometry,
    dx: &mut [f32],
    pixels: std::ops::Range<usize>,
    columns: &mut [f32],
    row_stride: usize,
    offset: usize,
) {
    let n = pixels.len();
    let [kh, kw] = geo.kernel;
    let plane = geo.in_h * geo.in_w;
    for ky in 0..kh {
        for kx in 0..kw {
            let run = UnstridedRun::new(geo, &pixels, ky, kx);
            for c in 0..geo.group_in() {
                let row = (c * kh + ky) * kw + kx;
                let src = &mut columns[row * row_stride + offset..][..n];
                run.zero_overhang(geo, &pixels, src);
                if !run.inside.is_empty() {
                    let channel = &mut dx[c * plane..(c + 1) * plane];
                    let source = run.source();
                    channel[source..source + run.inside.len()]
                        .iter_mut()
                        .zip(&src[run.inside.clone()])
                        .for_each(|(d, &v)| *d += v);
                }
            }
        }
    }
}

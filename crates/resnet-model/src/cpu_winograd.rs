//! Winograd convolutions for the large 3x3 stride-1 convolutions (a third of ResNet-50's
//! convolution time, most of ResNet-18's): F(2x2, 3x3) makes each 2x2 block of outputs from a
//! 4x4 input tile through 16 products instead of 36 (2.25x less GEMM work), F(4x4, 3x3) each
//! 4x4 block from a 6x6 tile through 36 products instead of 144 (4x less).
//!
//! With `n x n` output tiles and `a = n + 2`, the output block of input tile `d` is
//! `At [(G g Gt) * (Bt d B)] A` summed over input channels (`Bt` is a x a, `G` a x 3, `At`
//! n x a; the `Variant` impls spell them out): the elementwise product becomes `a * a` GEMMs
//! `M[xi] = U[xi] (out x in) * V[xi] (in x tiles)` (on AVX-512 CPUs through
//! [`crate::cpu_gemm512`], elsewhere the `gemm` crate). F(2x2, 3x3)'s coefficients are 0,
//! +-1 and +-1/2, so it rounds like the direct convolution; F(4x4, 3x3)'s reach 8 (and 1/24), which
//! costs about half a decimal digit (3e-6 to 7e-6 of the largest output against 1e-6; the
//! tests bound both). [`Plan`] picks F(4x4, 3x3) where it pays (ResNet-50's 56x56 and 28x28
//! stages at batch 8: 18% and 25% faster than F(2x2, 3x3)) and F(2x2, 3x3) elsewhere.
//!
//! The transforms are written once, generic over [`Lane`]: portable loops on `f32`, and on
//! AVX-512 CPUs 16-lane vectors ([`avx512`]), which also pick the windows' columns out of the
//! input rows and transpose the outputs into NCHW rows in registers, storing them there with
//! the epilogue (scalar loops and a row buffer otherwise); same operations, same results.
//!
//! Work units are runs of tile rows across the batch, sized so that the transformed inputs and
//! products of a unit stay in cache. Where the batch has fewer tiles than output channels (the
//! 7x7 stage), the products and outputs are split by output channels instead, after the
//! inputs by tile rows, so that each unit reads a quarter of U rather than all of it (the
//! 7x7 convolution at batch 8 about 5% faster). The plan depends on the shape only, never on
//! the thread count, so results do not either. Where any output comes out NaN or infinite, the caller
//! recomputes the convolution directly ([`conv2d`] returns `None`): the transforms mix a tile's
//! inputs, so a NaN or an infinity would reach outputs outside its 3x3 window, or turn an
//! infinity into a NaN (Inf - Inf).

#[cfg(target_arch = "x86_64")]
mod avx512;

use super::cpu_conv::{BALANCED_UNITS, Conv2dGeometry, Mat, SharedOut, gemm_mat, relu_nan};
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A unit's transformed inputs (a * a x in_channels x tiles) and products (a * a x
/// out_channels x tiles) stay within about this many floats together.
const UNIT_FLOATS: usize = 512 * 1024;

/// The input transforms' vector length: tile rows are processed in multiples of it.
const LANES: usize = 8;

/// Fewer tiles per GEMM than this and the direct convolution is faster.
const MIN_TILES_PER_UNIT: usize = 32;

/// With fewer input or output channels than this the transforms cost more than the GEMM saves.
const MIN_CHANNELS: usize = 64;

/// F(4x4, 3x3) needs at least this many tiles per call (over the batch): its weight transform
/// makes 36 matrices per call instead of 16, which fewer tiles do not repay (ResNet-18's
/// 64-channel 56x56 convolution at batch 1, 196 tiles: 0.92 ms against F2's 0.85; at batch 8,
/// 6.0 against 7.3).
const MIN_F4_TILES: usize = 256;

/// Outputs narrower than this take the direct path. At ResNet-50's 512-channel 7x7
/// convolution (batch 8) F(2x2, 3x3), 4x4 tiles for 49 outputs, measured 7.5 against 10.0 ms
/// direct (`conv_layers`), and whole ResNet-50 batch-8 passes 5-6 ms faster (alternating
/// `resnet bench` runs); smaller outputs were not measured. Its transformed weights take
/// 16 MiB per such convolution in the weight cache.
const MIN_OUTPUT_SIDE: usize = 7;

/// What the input and output transforms compute on: one `f32`, or (in [`avx512`]) 16 of them
/// in a vector. Both run the same operations in the same order, so they round alike.
trait Lane: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<f32, Output = Self> {}

impl Lane for f32 {}

/// One Winograd variant F(N x N, 3x3), with input tiles of side `A = N + 2`. The transforms
/// act on one column of a tile.
trait Variant<const N: usize, const A: usize> {
    /// `Bt d` for one column `d` of an input tile.
    fn input<T: Lane>(d: [T; A]) -> [T; A];
    /// `G g` for one column `g` of a 3x3 filter.
    fn weight(g: [f32; 3]) -> [f32; A];
    /// `At m` for one column `m` of a product tile.
    fn output<T: Lane>(m: [T; A]) -> [T; N];
}

/// F(2x2, 3x3): `Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`,
/// `G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]`, `At = [[1,1,1,0],[0,1,-1,-1]]`.
struct F2;

impl Variant<2, 4> for F2 {
    #[inline(always)]
    fn input<T: Lane>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }

    #[inline(always)]
    fn weight([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
        [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
    }

    #[inline(always)]
    fn output<T: Lane>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// F(4x4, 3x3) on the points 0, +-1, +-2 (Lavin and Gray's matrices):
/// `Bt = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],
/// [0,4,0,-5,0,1]]`, `G = [[1/4,0,0],[-1/6,-1/6,-1/6],[-1/6,1/6,-1/6],[1/24,1/12,1/6],
/// [1/24,-1/12,1/6],[0,0,1]]`, `At = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],
/// [0,1,-1,8,-8,1]]`.
struct F4;

impl Variant<4, 6> for F4 {
    #[inline(always)]
    fn input<T: Lane>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
        [
            d0 * 4.0 - d2 * 5.0 + d4,
            d4 + d3 - (d1 + d2) * 4.0,
            d4 - d3 + (d1 - d2) * 4.0,
            d4 - d2 + (d3 - d1) * 2.0,
            d4 - d2 - (d3 - d1) * 2.0,
            d1 * 4.0 - d3 * 5.0 + d5,
        ]
    }

    #[inline(always)]
    fn weight([g0, g1, g2]: [f32; 3]) -> [f32; 6] {
        [
            0.25 * g0,
            -(g0 + g1 + g2) / 6.0,
            -(g0 - g1 + g2) / 6.0,
            g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
            g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
            g2,
        ]
    }

    #[inline(always)]
    fn output<T: Lane>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
        [
            m0 + m1 + m2 + m3 + m4,
            m1 - m2 + (m3 - m4) * 2.0,
            m1 + m2 + (m3 + m4) * 4.0,
            m1 - m2 + (m3 - m4) * 8.0 + m5,
        ]
    }
}

/// `dst[l][j] = f(src[0][j], .., src[K-1][j])[l]` for `j < len`: one transform applied along
/// `len` columns at once, vectorized along `j`: LANES columns at a time go through local
/// arrays, as the compiler cannot tell that K + L slices held in arrays do not overlap (a
/// plain loop over them stayed scalar).
#[inline(always)]
fn apply<const K: usize, const L: usize>(
    src: [&[f32]; K],
    dst: [&mut [f32]; L],
    len: usize,
    f: impl Fn([f32; K]) -> [f32; L],
) {
    let src = src.map(|s| &s[..len]);
    let mut dst = dst.map(|d| &mut d[..len]);
    let whole = len / LANES * LANES;
    for j in (0..whole).step_by(LANES) {
        let mut x = [[0.0f32; LANES]; K];
        for (x, s) in x.iter_mut().zip(&src) {
            x.copy_from_slice(&s[j..j + LANES]);
        }
        let mut y = [[0.0f32; LANES]; L];
        for lane in 0..LANES {
            let values = f(std::array::from_fn(|k| x[k][lane]));
            for (y, value) in y.iter_mut().zip(values) {
                y[lane] = value;
            }
        }
        for (d, y) in dst.iter_mut().zip(&y) {
            d[j..j + LANES].copy_from_slice(y);
        }
    }
    for j in whole..len {
        let values = f(std::array::from_fn(|k| src[k][j]));
        for (d, value) in dst.iter_mut().zip(values) {
            d[j] = value;
        }
    }
}

/// `L` disjoint runs of `len` floats of `data`, at `start + i * stride` (`stride >= len`).
fn strided_mut<const L: usize>(
    data: &mut [f32],
    start: usize,
    stride: usize,
    len: usize,
) -> [&mut [f32]; L] {
    let mut rest = &mut data[start..];
    std::array::from_fn(|_| {
        let taken = std::mem::take(&mut rest);
        let (head, tail) = taken.split_at_mut(stride.min(taken.len()));
        rest = tail;
        &mut head[..len]
    })
}

/// `L` runs of `len` floats of `data`, at `start + i * stride`.
fn strided<const L: usize>(data: &[f32], start: usize, stride: usize, len: usize) -> [&[f32]; L] {
    std::array::from_fn(|i| &data[start + i * stride..][..len])
}

/// Which variant a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tile {
    F2,
    F4,
}

/// How a convolution is cut: runs of `rows_per_unit` tile rows over `batch * tiles_h` rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    tile: Tile,
    tiles_h: usize,
    tiles_w: usize,
    rows_per_unit: usize,
    units: usize,
    /// Whether the products run on [`crate::cpu_gemm512`] (the CPU has AVX-512) rather than
    /// the `gemm` crate.
    avx512: bool,
    /// Whether the transforms run on AVX-512 ([`avx512`]; same results as the portable loops).
    avx512_transforms: bool,
    /// Whether the products and outputs are split by output channels (after the inputs by
    /// tile rows) rather than by tile rows. Each unit of a split by tile rows reads all of U,
    /// one of a split by channels all of V: the second where V is the smaller, as where the
    /// batch has fewer tiles than output channels (the 7x7 stage at batch 8: 4 MiB of V, 16
    /// of U).
    split_channels: bool,
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
        // F(4x4, 3x3) does 4x less GEMM work than the direct convolution on whole tiles,
        // F(2x2, 3x3) 2.25x; partial tiles at the edges waste some of that. F4 where it saves
        // at least 1.5x what F2 saves (28x28 and 56x56 outputs: 1.78x; 14x14: 1.36x, as its
        // 4x4 tiles cover 16x16), where the batch has enough tiles to repay its larger weight
        // transform, and where its units get enough tiles; else F2.
        let covered = |n: usize| geo.out_h.next_multiple_of(n) * geo.out_w.next_multiple_of(n);
        let f4_pays = 4.0 * covered(2) as f64 >= 1.5 * 2.25 * covered(4) as f64
            && geo.batch * covered(4) / 16 >= MIN_F4_TILES;
        f4_pays
            .then(|| Self::with_tile(geo, Tile::F4))
            .flatten()
            .or_else(|| Self::with_tile(geo, Tile::F2))
    }

    /// The plan with `tile`, or `None` where its units would have too few tiles.
    fn with_tile(geo: &Conv2dGeometry, tile: Tile) -> Option<Self> {
        let (n, a) = match tile {
            Tile::F2 => (2, 4),
            Tile::F4 => (4, 6),
        };
        let (tiles_h, tiles_w) = (geo.out_h.div_ceil(n), geo.out_w.div_ceil(n));
        let rows = geo.batch * tiles_h;
        let per_tile = a * a * (geo.in_channels + geo.out_channels);
        let fit_rows = (UNIT_FLOATS / (per_tile * tiles_w)).max(1);
        // A multiple of BALANCED_UNITS units, so that 1, 2 or 4 threads share them evenly.
        let units = rows
            .div_ceil(fit_rows)
            .next_multiple_of(BALANCED_UNITS)
            .min(rows);
        let rows_per_unit = rows.div_ceil(units);
        let units = rows.div_ceil(rows_per_unit);
        (rows_per_unit * tiles_w >= MIN_TILES_PER_UNIT).then_some(Self {
            tile,
            tiles_h,
            tiles_w,
            rows_per_unit,
            units,
            avx512: crate::cpu_gemm512::available(),
            avx512_transforms: crate::cpu_gemm512::available(),
            split_channels: rows * tiles_w < geo.out_channels,
        })
    }
}

/// Per-thread scratch: transformed inputs, products, row buffers, output rows and one
/// output tile's transform.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
    y: Vec<f32>,
    tile: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// The whole batch's transformed inputs where the plan splits by channels, kept by the
    /// calling thread.
    static V_ALL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `U = G g Gt` for every (output, input) channel pair: `A * A` matrices of `in x out`
/// (output channels contiguous, as the GEMM reads them without packing), each stored in
/// panels of `panel` output channels ([`u_matrix`] floats), each panel `in` rows of `panel`:
/// row-major where `panel` is `out`.
fn transform_weights<V: Variant<N, A>, const N: usize, const A: usize>(
    geo: &Conv2dGeometry,
    weight: &[f32],
    panel: usize,
) -> Vec<f32> {
    /// Input channels per parallel task.
    const BLOCK: usize = 16;
    let (m, c) = (geo.out_channels, geo.in_channels);
    let mut u = vec![0.0f32; A * A * u_matrix(c, m, panel)];
    // Each task owns a run of BLOCK input channels of one panel (BLOCK * panel values) in
    // every matrix.
    let blocks_per_panel = c.div_ceil(BLOCK);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..m.div_ceil(panel) * blocks_per_panel)
        .map(|_| Vec::with_capacity(A * A))
        .collect();
    for matrix in u.chunks_exact_mut(u_matrix(c, m, panel)) {
        let parts = matrix
            .chunks_exact_mut(c * panel)
            .flat_map(|panel_part| panel_part.chunks_mut(BLOCK * panel));
        for (task, part) in tasks.iter_mut().zip(parts) {
            task.push(part);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut parts)| {
            let first_oc = task / blocks_per_panel * panel;
            let block = task % blocks_per_panel;
            let width = panel.min(m - first_oc);
            // Per input channel, across the panel's output channels at once (vectors along
            // `oc`): the filters g[k][oc], then t = G g as t[r][j][oc], then row r of U, G t[r],
            // into the matrices r * A..(r + 1) * A.
            let mut g = vec![0.0f32; 9 * width];
            let mut t = vec![0.0f32; A * 3 * width];
            for local in 0..parts[0].len() / panel {
                let ic = block * BLOCK + local;
                for oc in 0..width {
                    let filter = &weight[((first_oc + oc) * c + ic) * 9..][..9];
                    for (k, &value) in filter.iter().enumerate() {
                        g[k * width + oc] = value;
                    }
                }
                for j in 0..3 {
                    let dst = strided_mut::<A>(&mut t, j * width, 3 * width, width);
                    apply(
                        strided::<3>(&g, j * width, 3 * width, width),
                        dst,
                        width,
                        V::weight,
                    );
                }
                for (r, row_parts) in parts.chunks_exact_mut(A).enumerate() {
                    let mut matrices = row_parts.iter_mut();
                    let dst: [&mut [f32]; A] = std::array::from_fn(|_| {
                        matrices.next().map_or(Default::default(), |part| {
                            &mut part[local * panel..][..width]
                        })
                    });
                    apply(
                        strided::<3>(&t, r * 3 * width, width, width),
                        dst,
                        width,
                        V::weight,
                    );
                }
            }
        });
    u
}

/// Floats per matrix of U: `out` channels in panels of `panel` (the last one padded).
fn u_matrix(c: usize, m: usize, panel: usize) -> usize {
    m.next_multiple_of(panel) * c
}

/// The panel width U is stored in for `plan`: [`crate::cpu_gemm512::PANEL`] where its kernel
/// runs the products (a panel's rows then lie together: rows of 512 channels put each of
/// them in another page, and the 7x7 convolution at batch 8 took 6.79-6.87 ms against
/// 6.21-6.86 in panels), else the whole row (the gemm crate reads U row-major).
fn u_panel(plan: &Plan, m: usize) -> usize {
    if plan.avx512 {
        crate::cpu_gemm512::PANEL
    } else {
        m
    }
}

/// The storage a weight buffer belongs to (a flex tensor's shared bytes, covering exactly the
/// weights): the key of the transformed-weight cache. The cache holds a clone, which keeps the
/// buffer alive and shared: it cannot be freed (so its address cannot come back as another
/// tensor's), and flex copies a shared buffer before writing to it, so the weights under a key
/// never change.
pub(crate) type WeightOwner = Arc<burn::tensor::Bytes>;

/// At most this many bytes of transformed weights stay cached (least recently used go first).
/// At batch 8 ResNet-50's take 60 MiB (32 of them the 7x7 stage's F(2x2, 3x3)), ResNet-152's
/// 190, Wide ResNet-50-2's 242; Wide ResNet-101-2's 14x14 stage alone needs 352 (22 x 16), so
/// there some transforms are redone at every call.
const CACHE_BYTES: usize = 256 << 20;

/// One weight buffer's transforms: per variant (F2, F4), `[out, in]` channel counts (one
/// buffer could be read with two shapes) and panel width (see [`u_panel`]).
struct CachedWeights {
    owner: WeightOwner,
    transforms: Vec<(Tile, [usize; 3], Arc<Vec<f32>>)>,
    last_use: u64,
}

impl CachedWeights {
    fn bytes(&self) -> usize {
        4 * self
            .transforms
            .iter()
            .map(|(_, _, u)| u.len())
            .sum::<usize>()
    }
}

/// Transformed weights of the convolutions run so far, so that a model's weights are
/// transformed at its first call, not at every call (1.5 ms of ResNet-18's 25 ms at batch 1,
/// 6 ms of ResNet-50's 360 ms at batch 8). An entry whose weights nobody else holds any more
/// is dropped at the next lookup.
static CACHE: Mutex<Vec<CachedWeights>> = Mutex::new(Vec::new());

/// Lookups so far (the recency clock of the cache's entries).
static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// Set while training runs a convolution: its weights change at every step, so caching
    /// their transforms would only keep the previous step's weights alive (and make the
    /// optimizer copy them rather than update them in place).
    static CACHE_OFF: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the transformed-weight cache off on this thread (back as it was afterwards,
/// even if `f` panics).
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))] // training's convolutions only
pub(crate) fn without_weight_cache<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CACHE_OFF.set(self.0);
        }
    }
    let _restore = Restore(CACHE_OFF.replace(true));
    f()
}

/// Drop every cached weight transform (and the weights they keep alive).
pub(crate) fn clear_weight_cache() {
    CACHE.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

/// Number of weight buffers with cached transforms, and their bytes.
pub(crate) fn weight_cache_usage() -> (usize, usize) {
    let cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    (cache.len(), cache.iter().map(CachedWeights::bytes).sum())
}

/// `transform_weights` for `tile`, from the cache where `owner` names the weights' storage.
fn weights_for<V: Variant<N, A>, const N: usize, const A: usize>(
    geo: &Conv2dGeometry,
    weight: &[f32],
    owner: Option<&WeightOwner>,
    tile: Tile,
    panel: usize,
) -> Arc<Vec<f32>> {
    let Some(owner) = owner.filter(|_| !CACHE_OFF.get()) else {
        return Arc::new(transform_weights::<V, N, A>(geo, weight, panel));
    };
    let channels = [geo.out_channels, geo.in_channels, panel];
    let now = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let same = |entry: &CachedWeights| Arc::ptr_eq(&entry.owner, owner);
    let find = |entry: &CachedWeights| {
        let kind = |(t, c, _): &&(Tile, [usize; 3], Arc<Vec<f32>>)| *t == tile && *c == channels;
        entry
            .transforms
            .iter()
            .find(kind)
            .map(|(_, _, u)| Arc::clone(u))
    };
    {
        let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|entry| Arc::strong_count(&entry.owner) > 1);
        if let Some(entry) = cache.iter_mut().find(|entry| same(entry)) {
            entry.last_use = now;
            if let Some(u) = find(entry) {
                return u;
            }
        }
    }
    // Transformed outside the lock (another thread may do the same meanwhile: the first
    // result stored wins, both are equal).
    let u = Arc::new(transform_weights::<V, N, A>(geo, weight, panel));
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let index = match cache.iter().position(same) {
        Some(index) => index,
        None => {
            cache.push(CachedWeights {
                owner: Arc::clone(owner),
                transforms: Vec::new(),
                last_use: now,
            });
            cache.len() - 1
        }
    };
    let entry = &mut cache[index];
    let u = match find(entry) {
        Some(stored) => stored,
        None => {
            entry.transforms.push((tile, channels, Arc::clone(&u)));
            u
        }
    };
    shrink(&mut cache, index, CACHE_BYTES);
    u
}

/// Drop least recently used entries other than `index` until the cache holds at most
/// `budget` bytes; `index` too if it alone is over.
fn shrink(cache: &mut Vec<CachedWeights>, index: usize, budget: usize) {
    let mut kept = index;
    while cache.iter().map(CachedWeights::bytes).sum::<usize>() > budget {
        let Some(oldest) = (0..cache.len())
            .filter(|&i| i != kept)
            .min_by_key(|&i| cache[i].last_use)
        else {
            cache.clear();
            return;
        };
        cache.swap_remove(oldest);
        // swap_remove moved the last entry into `oldest`.
        if kept == cache.len() {
            kept = oldest;
        }
    }
}

/// `act(conv2d(x, weight) + bias + residual)` in NCHW for a geometry with a [`Plan`], or
/// `None` where an output came out NaN or infinite (the caller then computes it directly, so
/// that NaN and infinity reach exactly the outputs they reach there). `owner`, where given,
/// is the storage of `weight` (see [`WeightOwner`]): the weights' transform is then cached.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d(
    geo: &Conv2dGeometry,
    plan: &Plan,
    x: &[f32],
    weight: &[f32],
    owner: Option<&WeightOwner>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Option<Vec<f32>> {
    match plan.tile {
        Tile::F2 => conv2d_with::<F2, 2, 4>(geo, plan, x, weight, owner, bias, residual, relu),
        Tile::F4 => conv2d_with::<F4, 4, 6>(geo, plan, x, weight, owner, bias, residual, relu),
    }
}

#[allow(clippy::too_many_arguments)]
fn conv2d_with<V: Variant<N, A>, const N: usize, const A: usize>(
    geo: &Conv2dGeometry,
    plan: &Plan,
    x: &[f32],
    weight: &[f32],
    owner: Option<&WeightOwner>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
) -> Option<Vec<f32>> {
    let panel = u_panel(plan, geo.out_channels);
    let u = weights_for::<V, N, A>(geo, weight, owner, plan.tile, panel);
    let u_len = u_matrix(geo.in_channels, geo.out_channels, panel);
    let len = geo.output_len();
    // Not zeroed: every output row is written once, by the unit holding its tile row (and,
    // split by channels, its channels).
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedOut(out.as_mut_ptr());
    let finite = AtomicBool::new(true);
    let sequential = rayon::current_num_threads() == 1;
    let (c, m) = (geo.in_channels, geo.out_channels);
    let tw = plan.tiles_w;
    let all_rows = geo.batch * plan.tiles_h;
    let rows_of = |unit: usize| {
        let first = unit * plan.rows_per_unit;
        first..(first + plan.rows_per_unit).min(all_rows)
    };
    // The outputs' stage for tile rows and output channels whose products `prod` holds. Each
    // call must name rows and channels whose outputs no other unit writes (both callers below
    // do: their units cut the rows, or the channels, apart).
    let finish = |rows: std::ops::Range<usize>,
                  prod: &[f32],
                  channels: std::ops::Range<usize>,
                  y: &mut Vec<f32>,
                  tile: &mut Vec<f32>| {
        let to = Epilogue {
            bias,
            residual,
            relu,
            out: shared.ptr(),
        };
        // SAFETY: `out` has the output's length; the rows and channels are this unit's alone
        // (see above).
        if !unsafe { output_stage::<V, N, A>(geo, plan, rows, prod, channels, y, tile, &to) } {
            finite.store(false, Ordering::Relaxed);
        }
    };
    if plan.split_channels {
        // V for every tile first (units of tile rows, each into its own block), then units
        // of output channels, each multiplying all tiles by its columns of U.
        let block = A * A * v_matrix(plan, c, plan.rows_per_unit * tw);
        // Taken out of the thread-local rather than borrowed in place: while this thread waits
        // for the parallel loops below, rayon may run another task on it that convolves too.
        let mut buffer = V_ALL.take();
        // Only growth needs initializing: the products read only what the inputs' stage
        // writes.
        buffer.resize(plan.units * block, 0.0);
        let transform = |(unit, v): (usize, &mut [f32])| {
            SCRATCH.with_borrow_mut(|scratch| {
                input_stage::<V, N, A>(geo, plan, rows_of(unit), x, v, &mut scratch.rows);
            });
        };
        let v_all = &mut buffer[..plan.units * block];
        if sequential {
            v_all.chunks_mut(block).enumerate().for_each(transform);
        } else {
            v_all.par_chunks_mut(block).enumerate().for_each(transform);
        }
        let v_all = &*v_all;
        // Whole panels of U each (see `product`).
        let channel_block = m
            .div_ceil(BALANCED_UNITS)
            .next_multiple_of(crate::cpu_gemm512::PANEL);
        let parts = m.div_ceil(channel_block);
        let run = |part: usize| {
            let channels = part * channel_block..((part + 1) * channel_block).min(m);
            let width = channels.len();
            let all_tiles = all_rows * tw;
            SCRATCH.with_borrow_mut(|scratch| {
                let Scratch {
                    m: prod, y, tile, ..
                } = scratch;
                prod.resize(A * A * all_tiles * width, 0.0);
                // Matrix by matrix, so that U[xi]'s columns stay in cache over the tiles.
                for xi in 0..A * A {
                    for unit in 0..plan.units {
                        let rows = rows_of(unit);
                        let tiles = rows.len() * tw;
                        let matrix = v_matrix(plan, c, tiles);
                        let v = &v_all[unit * block + xi * matrix..][..c * tiles];
                        let first = rows.start * tw;
                        let dst = prod[(xi * all_tiles + first) * width..].as_mut_ptr();
                        // SAFETY: `prod` holds all_tiles rows of `width` for each matrix;
                        // these are rows first..first + tiles of matrix xi.
                        unsafe {
                            product(
                                plan,
                                tiles,
                                c,
                                v,
                                &u[xi * u_len..][..u_len],
                                m,
                                panel,
                                channels.clone(),
                                dst,
                            )
                        };
                    }
                }
                // This unit alone writes these channels' output rows.
                finish(0..all_rows, prod, channels, y, tile);
            });
        };
        if sequential {
            (0..parts).for_each(run);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
        V_ALL.set(buffer);
    } else {
        let run = |unit: usize| {
            let rows = rows_of(unit);
            let tiles = rows.len() * tw;
            SCRATCH.with_borrow_mut(|scratch| {
                let Scratch {
                    v,
                    m: prod,
                    rows: buf,
                    y,
                    tile,
                } = scratch;
                let matrix = v_matrix(plan, c, tiles);
                v.resize(A * A * matrix, 0.0);
                input_stage::<V, N, A>(geo, plan, rows.clone(), x, v, buf);
                prod.resize(A * A * m * tiles, 0.0);
                for xi in 0..A * A {
                    let dst = prod[xi * m * tiles..].as_mut_ptr();
                    // SAFETY: matrix xi of `prod` has `tiles` rows of `m`.
                    unsafe {
                        product(
                            plan,
                            tiles,
                            c,
                            &v[xi * matrix..][..c * tiles],
                            &u[xi * u_len..][..u_len],
                            m,
                            panel,
                            0..m,
                            dst,
                        )
                    };
                }
                // The unit writes only the output rows of its tile rows, which no other unit
                // covers.
                finish(rows, prod, 0..m, y, tile);
            });
        };
        if sequential {
            (0..plan.units).for_each(run);
        } else {
            (0..plan.units).into_par_iter().for_each(run);
        }
    }
    // SAFETY: the units' tile rows (and channels) cover every (image, tile row, channel), and
    // each writes all output rows of its tile rows (fewer at the bottom edge).
    unsafe { out.set_len(len) };
    finite.into_inner().then_some(out)
}

/// Floats per matrix of V for `tiles` tiles of a unit: `c` rows of `tiles`, and room for the
/// last row's vector overhang (see [`input_stage`]).
fn v_matrix(plan: &Plan, c: usize, tiles: usize) -> usize {
    c * tiles + plan.tiles_w.next_multiple_of(LANES) - plan.tiles_w
}

/// `apply(src, dst, len, f)`, on AVX-512 where `simd` says so (set only where the plan's
/// `avx512_transforms` is; `f` generic over [`Lane`]).
#[cfg(target_arch = "x86_64")]
macro_rules! transform {
    ($simd:expr, $src:expr, $dst:expr, $len:expr, $f:expr) => {
        if $simd {
            // SAFETY: the plan's `avx512_transforms` says the CPU has AVX-512F.
            unsafe { avx512::apply($src, $dst, $len, $f) }
        } else {
            apply($src, $dst, $len, $f)
        }
    };
}

#[cfg(not(target_arch = "x86_64"))]
macro_rules! transform {
    ($simd:expr, $src:expr, $dst:expr, $len:expr, $f:expr) => {
        apply($src, $dst, $len, $f)
    };
}

/// V = Bt d B for every tile of tile rows `rows` (batch-wide: `image * tiles_h + tile_row`)
/// and every input channel: `v` gets `A * A` matrices, [`v_matrix`] floats apart, each
/// `in_channels` rows of the tiles in row order. `buf` is scratch.
fn input_stage<V: Variant<N, A>, const N: usize, const A: usize>(
    geo: &Conv2dGeometry,
    plan: &Plan,
    rows: std::ops::Range<usize>,
    x: &[f32],
    v: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let c = geo.in_channels;
    let tw = plan.tiles_w;
    let tiles = rows.len() * tw;
    let plane_in = geo.in_h * geo.in_w;
    // The input transforms run along a tile row's `tw` tiles, as vectors of `lanes` (`tw`
    // rounded up to LANES): 7 or 14 tiles left most of each vector loop to its scalar
    // remainder. The extra lanes compute values that no output uses: in the row buffers they
    // are never read, and in V they land in the next tile row's slots (written after), the
    // next channel's (written after) or the room at the end of each matrix.
    let lanes = tw.next_multiple_of(LANES);
    // F(2x2, 3x3)'s input transform stays portable: on AVX-512 it measured no faster (its
    // tile rows of 4 and 7 tiles). The AVX-512 one writes the horizontally transformed rows as
    // whole vectors (`h_lanes` long).
    let simd_in = plan.avx512_transforms && N == 4;
    let h_lanes = tw.next_multiple_of(if simd_in { 16 } else { LANES });
    let matrix = v_matrix(plan, c, tiles);
    assert!(v.len() >= A * A * matrix, "V too short for its tiles");
    // One zero-padded input row (N * (tw + 1) elements) and its N phases (elements N * j + r
    // for r < N, `lanes + 1` each: window element k of tile j is phases[k % N][j + k / N]),
    // for the portable path, and A slots of A horizontally transformed rows (`h_lanes` each).
    let padded = N * (tw + 1);
    let phase_len = lanes + 1;
    buf.resize(padded + N * phase_len + A * A * h_lanes, 0.0);
    let (row_buf, rest) = buf.split_at_mut(padded);
    let (phases, h) = rest.split_at_mut(N * phase_len);

    // V[xi][channel][tile]. The horizontal half (Bt along each input row, for the window at
    // N * j) is kept per row in one of A slots: the next tile row of the same image reuses
    // the last A - N of them.
    for channel in 0..c {
        let mut previous = None;
        let mut slots: [usize; A] = std::array::from_fn(|i| i);
        for (i, row) in rows.clone().enumerate() {
            let (image, ty) = (row / plan.tiles_h, row % plan.tiles_h);
            let plane = &x[(image * c + channel) * plane_in..][..plane_in];
            let first_new = if ty > 0 && previous == Some((image, ty - 1)) {
                slots.rotate_left(N);
                A - N
            } else {
                0
            };
            previous = Some((image, ty));
            for (r, &slot) in slots.iter().enumerate().skip(first_new) {
                let iy = (N * ty + r) as isize - geo.pad_begin[0] as isize;
                let src = (0..geo.in_h as isize)
                    .contains(&iy)
                    .then(|| &plane[iy as usize * geo.in_w..][..geo.in_w]);
                let dst = strided_mut(h, slot * A * h_lanes, h_lanes, h_lanes);
                #[cfg(target_arch = "x86_64")]
                if simd_in {
                    // SAFETY: the plan's `avx512_transforms` says the CPU has AVX-512F.
                    unsafe { avx512::input_row::<V, N, A>(src, geo.pad_begin[1], dst, h_lanes) };
                    continue;
                }
                row_buf.fill(0.0);
                if let Some(src) = src {
                    // Input column ix sits at ix + pad in the padded row.
                    let pad = geo.pad_begin[1];
                    let len = geo.in_w.min(padded - pad);
                    row_buf[pad..pad + len].copy_from_slice(&src[..len]);
                }
                // The phases apart, so that each window element is a contiguous slice along
                // the windows.
                for (phase, out) in phases.chunks_exact_mut(phase_len).enumerate() {
                    // Index loops over slices cut to length: no bounds checks, so they
                    // vectorize.
                    let (out, src) = (&mut out[..tw + 1], &row_buf[phase..][..N * tw + 1]);
                    #[allow(clippy::needless_range_loop)]
                    for j in 0..tw + 1 {
                        out[j] = src[N * j];
                    }
                }
                let src: [&[f32]; A] =
                    std::array::from_fn(|k| &phases[(k % N) * phase_len + k / N..][..lanes]);
                apply(src, dst, lanes, V::input);
            }
            // Bt along the columns: V[r * A + b] (A matrices apart) from h[.][b].
            let col = i * tw;
            for b in 0..A {
                let src: [&[f32]; A] =
                    std::array::from_fn(|r| &h[(slots[r] * A + b) * h_lanes..][..h_lanes]);
                let dst = strided_mut(v, b * matrix + channel * tiles + col, A * matrix, lanes);
                transform!(simd_in, src, dst, lanes, V::input);
            }
        }
    }
}

/// One matrix of products for output channels `channels`: `dst (tiles x channels.len(), rows
/// contiguous) = v^T * u[.., channels]`, where `v` is V[xi] for `tiles` tiles (`c` rows of
/// `tiles`) and `u` is U[xi] (`c` rows of `m`, the input-by-output layout, in panels of
/// `panel` columns as [`transform_weights`] stores it; `channels` starts at a panel unless
/// `panel` is `m`). Stored tiles by channels (output channels contiguous: the GEMM's wide
/// register blocks then run along the channels, which are a multiple of 64, rather than
/// along a unit's tiles, which are not). On AVX-512 through cpu_gemm512, which reads both in
/// place (the gemm crate packs both for each of these small products: Winograd's layers took
/// 5-15% longer).
///
/// # Safety
/// `dst` must be valid for writes of `tiles * channels.len()` floats, aliasing nothing else.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    plan: &Plan,
    tiles: usize,
    c: usize,
    v: &[f32],
    u: &[f32],
    m: usize,
    panel: usize,
    channels: std::ops::Range<usize>,
    dst: *mut f32,
) {
    assert!(v.len() >= c * tiles && u.len() >= u_matrix(c, m, panel) && channels.end <= m);
    assert!(
        panel == m || (plan.avx512 && channels.start.is_multiple_of(panel)),
        "products from inside a panel of U"
    );
    let width = channels.len();
    let lhs = Mat::row_major(&v[..c * tiles], tiles).transposed();
    let first = channels.start / panel * c * panel + channels.start % panel;
    let rhs = Mat::row_major(&u[first..], panel);
    // SAFETY (both arms): lhs is tiles x c, rhs c x width inside `u` (checked above: whole
    // panels, or row-major), and the destination the caller's.
    if plan.avx512 {
        unsafe { crate::cpu_gemm512::product(tiles, width, c, dst, width, lhs, rhs, c * panel) };
    } else {
        unsafe { gemm_mat(tiles, width, c, dst, width, false, lhs, rhs) };
    }
}

/// What the outputs' stage adds and where it writes: `relu(y + bias + residual)` (bias and
/// residual where given, ReLU where `relu`) into `out`, the whole NCHW output.
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    relu: bool,
    out: *mut f32,
}

/// Y = At M A for the tiles of tile rows `rows` and the output channels `channels`, and the
/// epilogue, into the output. `prod` holds the products for those channels: `A * A`
/// matrices, each rows of `channels.len()` floats for every tile from the first of `rows`
/// on, in row order, up to the end of `prod`. Returns whether every output before the ReLU
/// was finite. `y` and `tile_buf` are scratch.
///
/// # Safety
/// `to.out` must be valid for writes of the output (`batch * out_channels * out_h * out_w`
/// floats, possibly uninitialized: rows are written whole before anything reads them), and no
/// other thread may touch the output rows of these tile rows and channels during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn output_stage<V: Variant<N, A>, const N: usize, const A: usize>(
    geo: &Conv2dGeometry,
    plan: &Plan,
    rows: std::ops::Range<usize>,
    prod: &[f32],
    channels: std::ops::Range<usize>,
    y: &mut Vec<f32>,
    tile_buf: &mut Vec<f32>,
    to: &Epilogue,
) -> bool {
    let m = channels.len();
    let tw = plan.tiles_w;
    let tiles = prod.len() / (A * A * m);
    assert!(
        tiles >= rows.len() * tw,
        "products for fewer tiles than rows"
    );
    let plane_out = geo.out_h * geo.out_w;
    let bias = to.bias.map(|b| &b[channels.clone()]);
    // At along the rows into T[r][q][oc], along the columns into Y[p][q][oc] (M[xi]'s rows
    // for a tile are contiguous in the channels); then Y into `y` (m x N rows x `width`
    // columns per tile row) and the epilogue on the way out, as the direct path's.
    // On AVX-512, `group` tiles' outputs (16 values per channel) go straight to the output
    // rows at once, the epilogue on the way (`y` unused).
    let group = if plan.avx512_transforms {
        16 / (N * N)
    } else {
        1
    };
    let width = N * tw;
    if !plan.avx512_transforms {
        y.resize(m * N * width, 0.0);
    }
    tile_buf.resize((A * N + group * N * N) * m, 0.0);
    let (t_rows, y_tiles) = tile_buf.split_at_mut(A * N * m);
    let mut finite = true;
    for (i, row) in rows.clone().enumerate() {
        let (image, ty) = (row / plan.tiles_h, row % plan.tiles_h);
        // This tile row's output rows of the first channel: channel `oc` is `plane_out` on.
        let first = (image * geo.out_channels + channels.start) * plane_out + N * ty * geo.out_w;
        for j in (0..tw).step_by(group) {
            // Past the row's last tile, a group repeats it (into columns no output uses).
            for (g, y_tile) in y_tiles.chunks_exact_mut(N * N * m).enumerate() {
                let t = i * tw + (j + g).min(tw - 1);
                for r in 0..A {
                    let src = strided::<A>(prod, ((r * A) * tiles + t) * m, tiles * m, m);
                    transform!(
                        plan.avx512_transforms,
                        src,
                        strided_mut(t_rows, r * N * m, m, m),
                        m,
                        V::output
                    );
                }
                for q in 0..N {
                    let src = strided::<A>(t_rows, q * m, N * m, m);
                    transform!(
                        plan.avx512_transforms,
                        src,
                        strided_mut(y_tile, q * m, N * m, m),
                        m,
                        V::output
                    );
                }
            }
            #[cfg(target_arch = "x86_64")]
            if plan.avx512_transforms {
                // Straight into the output with the epilogue (no `y`).
                let rows_to = avx512::OutRows {
                    out: to.out.wrapping_add(first),
                    residual: to.residual.map(|r| r[first..].as_ptr()),
                    bias,
                    relu: to.relu,
                    plane: plane_out,
                    width: geo.out_w,
                    rows: (geo.out_h - N * ty).min(N),
                };
                // SAFETY: AVX-512F per the plan; y_tiles holds 16 rows of m; the tile row's
                // output rows (and the residual's) exist for these channels of this image,
                // and belong to this unit; N * j < out_w as j < tw.
                finite &= unsafe { avx512::store_tiles::<N>(y_tiles, m, &rows_to, j) };
                continue;
            }
            for (oc, out_rows) in y.chunks_exact_mut(N * width).enumerate() {
                for p in 0..N {
                    for q in 0..N {
                        out_rows[p * width + N * j + q] = y_tiles[(p * N + q) * m + oc];
                    }
                }
            }
        }
        if plan.avx512_transforms {
            continue;
        }
        for oc in 0..m {
            let bias = bias.map_or(0.0, |b| b[oc]);
            for dy in 0..N {
                let oy = N * ty + dy;
                if oy >= geo.out_h {
                    break;
                }
                let start = first + oc * plane_out + dy * geo.out_w;
                let row = &mut y[(oc * N + dy) * width..][..geo.out_w];
                match to.residual {
                    Some(r) => {
                        for (v, &r) in row.iter_mut().zip(&r[start..start + geo.out_w]) {
                            let sum = *v + bias + r;
                            finite &= sum.is_finite();
                            *v = if to.relu { relu_nan(sum) } else { sum };
                        }
                    }
                    None => {
                        for v in row.iter_mut() {
                            let sum = *v + bias;
                            finite &= sum.is_finite();
                            *v = if to.relu { relu_nan(sum) } else { sum };
                        }
                    }
                }
                // SAFETY: output row `oy` of this channel and image lies inside the output
                // and belongs to this unit.
                unsafe {
                    std::ptr::copy_nonoverlapping(row.as_ptr(), to.out.add(start), row.len())
                };
            }
        }
    }
    finite
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::ops::ConvOptions;

    fn geometry(
        x: [usize; 4],
        out_channels: usize,
        padding: [(usize, usize); 2],
    ) -> Conv2dGeometry {
        let options = ConvOptions::new_with_padding([1, 1], padding, [1, 1], 1);
        Conv2dGeometry::new(x, [out_channels, x[1], 3, 3], &options).expect("valid geometry")
    }

    /// Deterministic values in [-1, 1).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Inputs, weights, bias and residual for a geometry (deterministic from `seed`), and the
    /// direct convolution's result with its largest magnitude.
    struct Case {
        x: Vec<f32>,
        w: Vec<f32>,
        bias: Vec<f32>,
        res: Vec<f32>,
        expected: Vec<f32>,
        scale: f32,
    }

    impl Case {
        fn new(geo: &Conv2dGeometry, seed: u32) -> Self {
            let x = values(geo.input_len(), seed);
            let w = values(geo.weight_len(), seed + 1);
            let bias = values(geo.out_channels, seed + 2);
            let res = values(geo.output_len(), seed + 3);
            let expected = naive(geo, &x, &w, &bias, &res);
            let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            Self {
                x,
                w,
                bias,
                res,
                expected,
                scale,
            }
        }
    }

    /// Direct convolution in float64, plus bias and residual, then ReLU.
    fn naive(geo: &Conv2dGeometry, x: &[f32], w: &[f32], bias: &[f32], res: &[f32]) -> Vec<f32> {
        let (c, m) = (geo.in_channels, geo.out_channels);
        let mut out = vec![0.0f32; geo.output_len()];
        for image in 0..geo.batch {
            for (oc, &b) in bias.iter().enumerate() {
                for oy in 0..geo.out_h {
                    for ox in 0..geo.out_w {
                        let mut sum = b as f64;
                        for ic in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let iy = (oy + ky) as isize - geo.pad_begin[0] as isize;
                                    let ix = (ox + kx) as isize - geo.pad_begin[1] as isize;
                                    if (0..geo.in_h as isize).contains(&iy)
                                        && (0..geo.in_w as isize).contains(&ix)
                                    {
                                        let xi = ((image * c + ic) * geo.in_h + iy as usize)
                                            * geo.in_w
                                            + ix as usize;
                                        let wi = ((oc * c + ic) * 3 + ky) * 3 + kx;
                                        sum += x[xi] as f64 * w[wi] as f64;
                                    }
                                }
                            }
                        }
                        let o = ((image * m + oc) * geo.out_h + oy) * geo.out_w + ox;
                        out[o] = (sum + res[o] as f64).max(0.0) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn weight_cache_drops_least_recently_used_first() {
        let entry = |floats: usize, last_use: u64| CachedWeights {
            owner: Arc::new(burn::tensor::Bytes::from_elems(vec![0.0f32])),
            transforms: vec![(Tile::F2, [1, 1, 1], Arc::new(vec![0.0; floats]))],
            last_use,
        };
        let uses = |cache: &[CachedWeights]| cache.iter().map(|e| e.last_use).collect::<Vec<_>>();
        // 4 entries of 400 bytes; a budget of 1000 keeps 2: the one just used (index 0, the
        // oldest use) and the most recent other one.
        let mut cache = vec![entry(100, 1), entry(100, 5), entry(100, 3), entry(100, 4)];
        shrink(&mut cache, 0, 1000);
        let mut left = uses(&cache);
        left.sort();
        assert_eq!(left, [1, 5]);
        // Within the budget: nothing goes.
        let mut cache = vec![entry(100, 1), entry(100, 2)];
        shrink(&mut cache, 1, 800);
        assert_eq!(uses(&cache), [1, 2]);
        // The entry just used is last: it moves when an earlier one goes, and still stays.
        let mut cache = vec![entry(100, 5), entry(100, 6), entry(100, 1)];
        shrink(&mut cache, 2, 500);
        assert_eq!(uses(&cache), [1]);
        // The entry just used is over the budget alone: nothing stays.
        let mut cache = vec![entry(100, 1), entry(1000, 2)];
        shrink(&mut cache, 1, 1000);
        assert!(cache.is_empty());
    }

    #[test]
    fn picks_f4_where_it_pays_and_f2_elsewhere() {
        let pad = [(1, 1); 2];
        let tile = |x, m| Plan::new(&geometry(x, m, pad)).map(|plan| plan.tile);
        // ResNet-50 at batch 8: layer1 and layer2 F4, layer3 (14x14) and layer4 (7x7) F2.
        assert_eq!(tile([8, 64, 56, 56], 64), Some(Tile::F4));
        assert_eq!(tile([8, 128, 28, 28], 128), Some(Tile::F4));
        assert_eq!(tile([8, 256, 14, 14], 256), Some(Tile::F2));
        assert_eq!(tile([8, 512, 7, 7], 512), Some(Tile::F2));
        // Batch 1 at 7x7: too few tiles per unit.
        assert_eq!(tile([1, 512, 7, 7], 512), None);
        // Batch 1: too few tiles for F4 at 56x56; too few per unit for F4 at 28x28.
        assert_eq!(tile([1, 64, 56, 56], 64), Some(Tile::F2));
        assert_eq!(tile([1, 128, 28, 28], 128), Some(Tile::F2));
        // Too few channels.
        assert_eq!(tile([8, 32, 56, 56], 32), None);
        // Split by channels where the batch has fewer tiles than output channels.
        let split = |x, m| Plan::new(&geometry(x, m, pad)).map(|plan| plan.split_channels);
        assert_eq!(split([8, 512, 7, 7], 512), Some(true));
        assert_eq!(split([8, 256, 14, 14], 256), Some(false));
        assert_eq!(split([4, 256, 14, 14], 256), Some(true));
    }

    /// Split by output channels (U in panels, the last one partial) or by tile rows: the same
    /// results, bit for bit where cpu_gemm512 runs the products (each output sums the same
    /// products in the same order), and as the direct convolution.
    #[test]
    fn splitting_by_channels_changes_nothing() {
        let geo = geometry([8, 64, 7, 7], 200, [(1, 1); 2]);
        let Case {
            x,
            w,
            bias,
            res,
            expected,
            scale,
        } = Case::new(&geo, 11);
        let plan = Plan::new(&geo).expect("a Winograd plan");
        assert!(plan.split_channels && plan.tile == Tile::F2);
        let kernels: &[bool] = if crate::cpu_gemm512::available() {
            &[false, true]
        } else {
            &[false]
        };
        for &avx512 in kernels {
            let run = |split_channels| {
                let plan = Plan {
                    avx512,
                    avx512_transforms: avx512,
                    split_channels,
                    ..plan
                };
                conv2d(&geo, &plan, &x, &w, None, Some(&bias), Some(&res), true)
                    .expect("finite outputs")
            };
            let (by_rows, by_channels) = (run(false), run(true));
            for got in [&by_rows, &by_channels] {
                let diff = got
                    .iter()
                    .zip(&expected)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 2e-6 * scale, "AVX-512 {avx512}: differs by {diff}");
            }
            if avx512 {
                let first = by_rows
                    .iter()
                    .zip(&by_channels)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(first, None, "split by channels against by tile rows");
            }
        }
    }

    #[test]
    fn both_variants_match_a_direct_convolution() {
        // Odd output sizes (31 x 29: partial tiles for both) and asymmetric padding.
        let geo = geometry([2, 16, 30, 30], 24, [(2, 1), (0, 1)]);
        assert_eq!((geo.out_h, geo.out_w), (31, 29));
        let Case {
            x,
            w,
            bias,
            res,
            expected,
            scale,
        } = Case::new(&geo, 1);
        // F2's coefficients are 0, +-1 and +-1/2: direct convolution's rounding. F4's reach 8.
        // The products and transforms portable, and on AVX-512 where the CPU has it.
        let kernels: &[bool] = if crate::cpu_gemm512::available() {
            &[false, true]
        } else {
            &[false]
        };
        for (tile, tolerance) in [(Tile::F2, 2e-6), (Tile::F4, 1e-5)] {
            for &avx512 in kernels {
                let plan = Plan {
                    avx512,
                    avx512_transforms: avx512,
                    ..Plan::with_tile(&geo, tile).expect("enough tiles per unit")
                };
                let got = conv2d(&geo, &plan, &x, &w, None, Some(&bias), Some(&res), true)
                    .expect("finite outputs");
                let diff = got
                    .iter()
                    .zip(&expected)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= tolerance * scale,
                    "{tile:?} (AVX-512 products: {avx512}): differs by {diff} (largest output \
                     {scale})"
                );
            }
        }
    }

    #[test]
    fn avx512_transforms_match_the_portable_ones_bit_for_bit() {
        if !crate::cpu_gemm512::available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Tile rows of 4 to 17 tiles (one vector, a partial one, two), channel counts that
        // are not multiples of 16, edge tiles cut by the output, padding on one side only.
        let cases = [
            ([2, 16, 30, 30], 24, [(2, 1), (0, 1)]),
            ([3, 20, 14, 14], 40, [(1, 1), (1, 1)]),
            ([1, 16, 68, 33], 17, [(1, 1), (1, 0)]),
            ([16, 64, 7, 7], 64, [(1, 1), (1, 1)]),
        ];
        let mut compared = 0;
        for (x_shape, out_channels, padding) in cases {
            let geo = geometry(x_shape, out_channels, padding);
            let x = values(geo.input_len(), 7);
            let w = values(geo.weight_len(), 8);
            let bias = values(geo.out_channels, 9);
            let res = values(geo.output_len(), 10);
            for tile in [Tile::F2, Tile::F4] {
                let Some(plan) = Plan::with_tile(&geo, tile) else {
                    continue;
                };
                // With bias, residual and ReLU, and with none of them.
                for epilogue in [true, false] {
                    let run = |avx512_transforms| {
                        let plan = Plan {
                            avx512_transforms,
                            ..plan
                        };
                        let (bias, res) = (Some(&bias[..]), Some(&res[..]));
                        let (bias, res) = if epilogue { (bias, res) } else { (None, None) };
                        conv2d(&geo, &plan, &x, &w, None, bias, res, epilogue)
                            .expect("finite outputs")
                    };
                    let (portable, avx512) = (run(false), run(true));
                    // Bit for bit: -0 and +0 apart too.
                    let first = portable
                        .iter()
                        .zip(&avx512)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(
                        first, None,
                        "{x_shape:?} -> {out_channels}, {tile:?}, epilogue {epilogue}"
                    );
                }
                compared += 1;
            }
        }
        // F4 has too few tiles per unit at 14x14 and 7x7.
        assert_eq!(compared, 6);
    }

    #[test]
    fn non_finite_outputs_hand_the_convolution_back() {
        let geo = geometry([2, 16, 30, 30], 16, [(1, 1); 2]);
        let mut x = values(geo.input_len(), 5);
        let w = values(geo.weight_len(), 6);
        for (tile, special) in [(Tile::F2, f32::NAN), (Tile::F4, f32::INFINITY)] {
            let plan = Plan::with_tile(&geo, tile).expect("enough tiles per unit");
            assert!(conv2d(&geo, &plan, &x, &w, None, None, None, false).is_some());
            x[1234] = special;
            assert!(
                conv2d(&geo, &plan, &x, &w, None, None, None, false).is_none(),
                "{tile:?} with {special} in the input"
            );
            x[1234] = 0.5;
        }
    }
}

//! A training run's records: `metrics.csv`, `curves.png`, `confusion.csv` and `confusion.png`.
//!
//! The figures are drawn in two passes into an RGB buffer, then written as PNG with the
//! `image` crate:
//! - shapes (grid, axes, lines, markers, cells) with [plotters](https://crates.io/crates/plotters)
//!   and its bitmap backend, built without its `ttf` feature, so without font-kit, fontconfig or
//!   FreeType;
//! - text with [ab_glyph](https://crates.io/crates/ab_glyph) (pure Rust), laid out here with
//!   the font's advances and kerning at sub-pixel positions, in DejaVu Sans embedded in the
//!   binary from the [`dejavu`](https://crates.io/crates/dejavu) crate.
//!
//! Drawing therefore needs no system library and no font file, at build or at run time. DejaVu
//! fonts are (c) Bitstream, Inc. (Bitstream Vera), with the DejaVu changes in the public domain,
//! under the permissive Bitstream Vera Fonts license, which allows embedding and
//! redistribution (the copyright and license notice must accompany the font software); the
//! `dejavu` crate's own code is MIT OR Apache-2.0.
//!
//! Every file is written atomically: to a temporary file in the same folder, then renamed over
//! the destination, so a reader (or a crash) never sees half a file.

use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use anyhow::{Context, bail};
use image::ImageEncoder;
use image::codecs::png::PngEncoder;
use plotters::coord::Shift;
use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

/// One row of `metrics.csv`: a split's summary for one epoch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EpochMetrics {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// `"train"` or `"val"`.
    pub split: String,
    /// Mean loss over the epoch (NaN when unknown).
    pub loss: f64,
    /// Top-1 accuracy as a fraction in [0, 1] (NaN when unknown); plotted in percent.
    pub acc1: f64,
    /// Top-5 accuracy as a fraction in [0, 1], when computed.
    pub acc5: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall-clock seconds the epoch's split took.
    pub seconds: f64,
}

/// Size of `curves.png`, in pixels (width, height).
pub const CURVES_SIZE: (u32, u32) = (1000, 450);
/// Size of `confusion.png`, in pixels (width, height).
pub const CONFUSION_SIZE: (u32, u32) = (800, 800);

/// Line colors: matplotlib's tab10 blue, orange, green, red, purple.
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];
const GRID: RGBColor = RGBColor(228, 228, 228);
const AXIS: RGBColor = RGBColor(120, 120, 120);
const INK: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(100, 100, 100);

/// Writes `metrics.csv`: the header `epoch,split,loss,acc1,acc5,lr,seconds`, then one line per
/// row. Numbers are written in full precision (Rust's shortest round-trip form, `NaN` when
/// unknown), `acc5` is empty when `None`, and a split name is quoted if it needs to be.
/// Written atomically.
pub fn write_metrics_csv(path: &Path, rows: &[EpochMetrics]) -> std::io::Result<()> {
    let mut out = String::from("epoch,split,loss,acc1,acc5,lr,seconds\n");
    for r in rows {
        let acc5 = r.acc5.map(|v| v.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.epoch,
            csv_field(&r.split),
            r.loss,
            r.acc1,
            acc5,
            r.lr,
            r.seconds
        ));
    }
    write_atomic(path, out.as_bytes())
}

/// Writes `confusion.csv`: a header row `true\predicted` followed by the predicted class
/// names, then one row per true class, its name first, then the counts. `matrix[t][p]` counts
/// the samples of true class `t` predicted as `p`. Names are quoted as CSV requires. Written
/// atomically.
///
/// # Errors
///
/// `InvalidInput` when the matrix is not `classes.len()` square; I/O errors.
pub fn write_confusion_csv(
    path: &Path,
    classes: &[String],
    matrix: &[Vec<u64>],
) -> std::io::Result<()> {
    check_matrix(classes, matrix)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut out = String::from("true\\predicted");
    for name in classes {
        out.push(',');
        out.push_str(&csv_field(name));
    }
    out.push('\n');
    for (name, row) in classes.iter().zip(matrix) {
        out.push_str(&csv_field(name));
        for count in row {
            out.push(',');
            out.push_str(&count.to_string());
        }
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// A CSV field, quoted (RFC 4180) when it holds a comma, a quote or a line break, or has
/// leading or trailing spaces.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.trim() != s {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Checks that `matrix` is `classes.len()` x `classes.len()`.
fn check_matrix(classes: &[String], matrix: &[Vec<u64>]) -> anyhow::Result<()> {
    let n = classes.len();
    if matrix.len() != n || matrix.iter().any(|row| row.len() != n) {
        let rows: Vec<usize> = matrix.iter().map(Vec::len).collect();
        bail!("confusion matrix must be {n} x {n} for {n} classes, got rows of lengths {rows:?}");
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder, created with the
/// usual permissions (0666 less the umask on Unix, not tempfile's owner-only default).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(
        ".{}.",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.flush()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Turns a plotters error into an `anyhow` one (its error types borrow the backend).
fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

/// The embedded DejaVu Sans, regular and bold.
struct Fonts {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

impl Fonts {
    /// The fonts, parsed once.
    fn get() -> anyhow::Result<&'static Fonts> {
        static FONTS: OnceLock<Option<Fonts>> = OnceLock::new();
        FONTS
            .get_or_init(|| {
                Some(Fonts {
                    regular: FontRef::try_from_slice(dejavu::sans::regular()).ok()?,
                    bold: FontRef::try_from_slice(dejavu::sans::bold()).ok()?,
                })
            })
            .as_ref()
            .context("cannot load the embedded DejaVu Sans fonts")
    }

    fn font(&self, bold: bool) -> &FontRef<'static> {
        if bold { &self.bold } else { &self.regular }
    }

    /// The advance width of `text` in pixels, kerning included.
    fn width(&self, text: &str, size: f32, bold: bool) -> f32 {
        let font = self.font(bold).as_scaled(PxScale::from(size));
        let mut width = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            prev = Some(id);
        }
        width
    }
}

/// A piece of text to draw once the shapes are drawn.
#[derive(Clone)]
struct Label {
    text: String,
    /// The anchor point, in pixels.
    at: (i32, i32),
    /// Font size: the font's line height (ascent + descent), in pixels.
    size: f32,
    bold: bool,
    color: RGBColor,
    /// Where the anchor is along the text: its start (`Left`), middle or end (`Right`).
    h: HPos,
    /// Where the anchor is across the text: the capitals' top, their middle, or the
    /// descenders' bottom.
    v: VPos,
    /// Rotated a quarter turn counter-clockwise, reading upwards.
    vertical: bool,
}

impl Label {
    fn new(text: impl Into<String>, at: (i32, i32), size: f32) -> Self {
        Self {
            text: text.into(),
            at,
            size,
            bold: false,
            color: INK,
            h: HPos::Center,
            v: VPos::Center,
            vertical: false,
        }
    }

    fn anchor(mut self, h: HPos, v: VPos) -> Self {
        (self.h, self.v) = (h, v);
        self
    }

    fn bold(mut self) -> Self {
        self.bold = true;
        self
    }

    fn color(mut self, color: RGBColor) -> Self {
        self.color = color;
        self
    }

    fn vertical(mut self) -> Self {
        self.vertical = true;
        self
    }
}

/// An RGB8 image being drawn.
struct Canvas {
    rgb: Vec<u8>,
    width: u32,
    height: u32,
}

impl Canvas {
    fn new((width, height): (u32, u32)) -> Self {
        Self {
            rgb: vec![255; width as usize * height as usize * 3],
            width,
            height,
        }
    }

    /// Mixes `color` into pixel `(x, y)` with opacity `alpha`; outside pixels are ignored.
    fn blend(&mut self, x: i32, y: i32, color: RGBColor, alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i32 || y >= self.height as i32 {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let a = alpha.clamp(0.0, 1.0);
        for (k, c) in [color.0, color.1, color.2].into_iter().enumerate() {
            let old = f32::from(self.rgb[i + k]);
            self.rgb[i + k] = (old + (f32::from(c) - old) * a).round() as u8;
        }
    }

    /// Draws a label: glyphs placed at sub-pixel positions with the font's advances and
    /// kerning, rasterized with anti-aliasing.
    fn text(&mut self, fonts: &Fonts, label: &Label) {
        let font = fonts.font(label.bold);
        let scaled = font.as_scaled(PxScale::from(label.size));
        let cap = font
            .outline(font.glyph_id('H'))
            .map_or(scaled.ascent() * 0.75, |o| {
                o.bounds.min.y.abs().max(o.bounds.max.y.abs()) * scaled.v_scale_factor()
            });
        let width = fonts.width(&label.text, label.size, label.bold);
        let start = match label.h {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let baseline = match label.v {
            VPos::Top => cap,
            VPos::Center => cap / 2.0,
            VPos::Bottom => scaled.descent(),
        };
        // Horizontal text is laid out at its anchor's pixel position (with sub-pixel
        // precision); vertical text around the origin, then rotated onto the anchor.
        let (ox, oy) = if label.vertical {
            (0.0, 0.0)
        } else {
            (label.at.0 as f32, label.at.1 as f32)
        };
        let mut pen = start;
        let mut prev = None;
        for c in label.text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                pen += scaled.kern(p, id);
            }
            let glyph = id.with_scale_and_position(label.size, point(ox + pen, oy + baseline));
            pen += scaled.h_advance(id);
            prev = Some(id);
            let Some(outlined) = font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outlined.px_bounds();
            let (bx, by) = (bounds.min.x as i32, bounds.min.y as i32);
            outlined.draw(|gx, gy, coverage| {
                let (u, v) = (bx + gx as i32, by + gy as i32);
                let (x, y) = if label.vertical {
                    (label.at.0 + v, label.at.1 - u - 1)
                } else {
                    (u, v)
                };
                self.blend(x, y, label.color, coverage);
            });
        }
    }
}

/// Draws the shapes with plotters, then the labels they returned, and writes the PNG.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>, &Fonts) -> anyhow::Result<Vec<Label>>,
) -> anyhow::Result<()> {
    let fonts = Fonts::get()?;
    let mut canvas = Canvas::new(size);
    let labels = {
        let root = BitMapBackend::with_buffer(&mut canvas.rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let labels = draw(&root, fonts)?;
        root.present().map_err(plot_err)?;
        labels
    };
    for label in &labels {
        canvas.text(fonts, label);
    }
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&canvas.rgb, size.0, size.1, image::ExtendedColorType::Rgb8)
        .context("encoding PNG")?;
    write_atomic(path, &png).with_context(|| format!("writing {}", path.display()))
}

/// The splits present in `rows`: `train` first, then `val`, then any other in sorted order.
fn split_names(rows: &[EpochMetrics]) -> Vec<String> {
    let mut names: Vec<String> = rows.iter().map(|r| r.split.clone()).collect();
    let rank = |s: &str| match s {
        "train" => 0,
        "val" => 1,
        _ => 2,
    };
    names.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
    names.dedup();
    names
}

/// One curve: a split's name, color and finite `(epoch, value)` points.
type Curve = (String, RGBColor, Vec<(i64, f64)>);

/// The curves of `value` for each split.
fn curves(rows: &[EpochMetrics], value: impl Fn(&EpochMetrics) -> f64) -> Vec<Curve> {
    split_names(rows)
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let mut points: Vec<(i64, f64)> = rows
                .iter()
                .filter(|r| r.split == name)
                .map(|r| (r.epoch as i64, value(r)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            points.sort_by_key(|p| p.0);
            (name, PALETTE[i % PALETTE.len()], points)
        })
        .collect()
}

/// A y range showing all curves with a margin, within `bounds`.
fn y_range(curves: &[Curve], bounds: (f64, f64)) -> Range<f64> {
    let values = curves.iter().flat_map(|c| c.2.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        let lo = bounds.0.max(0.0);
        return lo..(lo + 1.0).min(bounds.1);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else {
        (hi.abs() * 0.1).max(0.05)
    };
    let (lo, hi) = ((lo - pad).max(bounds.0), (hi + pad).min(bounds.1));
    if hi > lo { lo..hi } else { lo..lo + 1.0 }
}

/// Decimals that tick labels `step` apart need.
fn decimals(step: f64) -> usize {
    if step.is_finite() && step > 0.0 && step < 1.0 {
        (-step.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        0
    }
}

/// Draws `curves.png`: two panels side by side, the loss and the top-1 accuracy (in percent)
/// per epoch, one line (with markers) per split (`train` blue, `val` orange), each with a
/// legend, axis labels, a caption, and a title over both. Non-finite values are left out;
/// the accuracy caption names the best validation epoch. 1000 x 450 pixels ([`CURVES_SIZE`]).
pub fn draw_curves(path: &Path, rows: &[EpochMetrics]) -> anyhow::Result<()> {
    render(path, CURVES_SIZE, |root, fonts| {
        let (width, height) = root.dim_in_pixel();
        let (width, height) = (width as i32, height as i32);
        let mut labels = vec![
            Label::new("Training curves", (width / 2, 12), 21.0)
                .bold()
                .anchor(HPos::Center, VPos::Top),
        ];
        let loss = curves(rows, |r| r.loss);
        let acc = curves(rows, |r| r.acc1 * 100.0);
        let best_val = acc
            .iter()
            .find(|c| c.0 == "val")
            .and_then(|c| c.2.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1)));
        let acc_title = match best_val {
            Some((epoch, v)) => format!("Top-1 accuracy (best val {v:.2}% at epoch {epoch})"),
            None => "Top-1 accuracy".to_string(),
        };
        let epochs = rows.iter().map(|r| r.epoch as i64);
        let (first, last) = (epochs.clone().min().unwrap_or(1), epochs.max().unwrap_or(1));
        let x = if last > first {
            first..last
        } else {
            (first - 1).max(0)..last + 1
        };
        let loss_floor = if y_range(&loss, (f64::MIN, f64::MAX)).start >= 0.0 {
            0.0
        } else {
            f64::MIN
        };
        let half = width / 2;
        let panels = [
            Panel {
                title: "Loss".to_string(),
                y_desc: "loss",
                x: x.clone(),
                y: y_range(&loss, (loss_floor, f64::MAX)),
                curves: loss,
                legend_top: true,
            },
            Panel {
                title: acc_title,
                y_desc: "top-1 accuracy (%)",
                x,
                y: y_range(&acc, (0.0, 100.0)),
                curves: acc,
                legend_top: false,
            },
        ];
        for (k, panel) in panels.iter().enumerate() {
            let left = k as i32 * half;
            let plot = (left + 78, 78, left + half - 24, height - 62);
            labels.extend(panel.draw(root, fonts, left, plot)?);
        }
        Ok(labels)
    })
}

/// One panel of `curves.png`.
struct Panel {
    title: String,
    y_desc: &'static str,
    x: Range<i64>,
    y: Range<f64>,
    curves: Vec<Curve>,
    /// The legend goes in the top right corner (else the bottom right).
    legend_top: bool,
}

impl Panel {
    /// Draws the panel's shapes in the plot rectangle `(x0, y0, x1, y1)` (pixels) of a panel
    /// starting at `left`, and returns its labels.
    fn draw(
        &self,
        root: &DrawingArea<BitMapBackend<'_>, Shift>,
        fonts: &Fonts,
        left: i32,
        (x0, y0, x1, y1): (i32, i32, i32, i32),
    ) -> anyhow::Result<Vec<Label>> {
        const TICK: f32 = 13.0;
        let mut labels = Vec::new();
        let area = root.clone().shrink((x0, y0), (x1 - x0, y1 - y0));
        let chart = ChartBuilder::on(&area)
            .build_cartesian_2d(self.x.clone(), self.y.clone())
            .map_err(plot_err)?;
        let n_x = (self.x.end - self.x.start + 1).clamp(2, 12) as usize;
        let x_ticks = chart.as_coord_spec().x_spec().key_points(n_x);
        let y_ticks = chart.as_coord_spec().y_spec().key_points(8usize);
        let y_step = match y_ticks.as_slice() {
            [a, b, ..] => b - a,
            _ => 1.0,
        };
        let places = decimals(y_step);

        // Grid, frame, ticks and their labels.
        let line = |from: (i32, i32), to: (i32, i32), color: RGBColor| {
            root.draw(&PathElement::new(vec![from, to], color))
                .map_err(plot_err)
        };
        for &v in &y_ticks {
            let (_, py) = chart.backend_coord(&(self.x.start, v));
            line((x0, py), (x1, py), GRID)?;
            line((x0 - 5, py), (x0, py), AXIS)?;
            labels.push(
                Label::new(format!("{v:.places$}"), (x0 - 8, py), TICK)
                    .anchor(HPos::Right, VPos::Center),
            );
        }
        for &e in &x_ticks {
            let (px, _) = chart.backend_coord(&(e, self.y.start));
            line((px, y0), (px, y1), GRID)?;
            line((px, y1), (px, y1 + 5), AXIS)?;
            labels.push(
                Label::new(e.to_string(), (px, y1 + 9), TICK).anchor(HPos::Center, VPos::Top),
            );
        }
        root.draw(&Rectangle::new([(x0, y0), (x1, y1)], AXIS))
            .map_err(plot_err)?;
        let mid_x = (x0 + x1) / 2;
        labels.push(
            Label::new(self.title.as_str(), (mid_x, y0 - 14), 16.0)
                .anchor(HPos::Center, VPos::Bottom),
        );
        labels.push(Label::new("epoch", (mid_x, y1 + 32), 15.0).anchor(HPos::Center, VPos::Top));
        labels.push(Label::new(self.y_desc, (left + 22, (y0 + y1) / 2), 15.0).vertical());

        // Curves.
        let drawn: Vec<&Curve> = self.curves.iter().filter(|c| !c.2.is_empty()).collect();
        let mut chart = chart;
        for (_, color, points) in &drawn {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            if points.len() <= 60 {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
        }
        if drawn.is_empty() {
            labels.push(Label::new("no data yet", (mid_x, (y0 + y1) / 2), 16.0).color(MUTED));
            return Ok(labels);
        }

        // Legend: a white box with a line sample and the split's name per curve.
        const ROW: i32 = 22;
        const SIZE: f32 = 14.0;
        let text_w = drawn
            .iter()
            .map(|c| fonts.width(&c.0, SIZE, false).ceil() as i32)
            .max()
            .unwrap_or(0);
        let (box_w, box_h) = (12 + 24 + 8 + text_w + 12, 8 + ROW * drawn.len() as i32);
        let bx1 = x1 - 10;
        let by0 = if self.legend_top {
            y0 + 10
        } else {
            y1 - 10 - box_h
        };
        let (bx0, by1) = (bx1 - box_w, by0 + box_h);
        root.draw(&Rectangle::new(
            [(bx0, by0), (bx1, by1)],
            WHITE.mix(0.9).filled(),
        ))
        .map_err(plot_err)?;
        root.draw(&Rectangle::new(
            [(bx0, by0), (bx1, by1)],
            RGBColor(200, 200, 200),
        ))
        .map_err(plot_err)?;
        for (k, (name, color, _)) in drawn.iter().enumerate() {
            let cy = by0 + 4 + ROW * k as i32 + ROW / 2;
            root.draw(&PathElement::new(
                vec![(bx0 + 12, cy), (bx0 + 36, cy)],
                color.stroke_width(2),
            ))
            .map_err(plot_err)?;
            root.draw(&Circle::new((bx0 + 24, cy), 3, color.filled()))
                .map_err(plot_err)?;
            labels.push(
                Label::new(name.as_str(), (bx0 + 44, cy), SIZE).anchor(HPos::Left, VPos::Center),
            );
        }
        Ok(labels)
    }
}

/// Matplotlib's "Blues" color map at `t` in [0, 1], interpolated between 5 of its stops.
fn blues(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (247.0, 251.0, 255.0),
        (198.0, 219.0, 239.0),
        (107.0, 174.0, 214.0),
        (33.0, 113.0, 181.0),
        (8.0, 48.0, 107.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let lerp = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// `name`, shortened to at most `max_width` pixels by an ellipsis in the middle (the start and
/// the end of class names are usually what tells them apart).
fn fit_label(fonts: &Fonts, name: &str, size: f32, max_width: f32) -> String {
    if fonts.width(name, size, false) <= max_width {
        return name.to_string();
    }
    let chars: Vec<char> = name.chars().collect();
    for keep in (1..chars.len()).rev() {
        let tail = keep / 2;
        let head = keep - tail;
        let candidate: String = chars[..head]
            .iter()
            .chain(['\u{2026}'].iter())
            .chain(&chars[chars.len() - tail..])
            .collect();
        if fonts.width(&candidate, size, false) <= max_width {
            return candidate;
        }
    }
    "\u{2026}".to_string()
}

/// Draws `confusion.png`: a heat map of `matrix` (true classes down, predicted classes
/// across, `matrix[t][p]` in row `t`, column `p`) with the class names on both axes and the
/// count in each cell. A cell's shade is the share of its true class's samples
/// (row-normalized, matplotlib's "Blues"), so rare classes read as clearly as common ones; the
/// title gives the total and the top-1 accuracy. Long class names are shortened with an
/// ellipsis. 800 x 800 pixels ([`CONFUSION_SIZE`]); meant for up to about 20 classes.
///
/// # Errors
///
/// A matrix that is not `classes.len()` square, or a write failure.
pub fn draw_confusion(path: &Path, classes: &[String], matrix: &[Vec<u64>]) -> anyhow::Result<()> {
    check_matrix(classes, matrix)?;
    let n = classes.len();
    let total: u64 = matrix.iter().flatten().sum();
    let correct: u64 = (0..n).map(|i| matrix[i][i]).sum();
    render(path, CONFUSION_SIZE, |root, fonts| {
        let (width, height) = root.dim_in_pixel();
        let (width, height) = (width as i32, height as i32);
        let title = if total > 0 {
            format!(
                "Confusion matrix: {total} images, top-1 {:.2}%",
                100.0 * correct as f64 / total as f64
            )
        } else {
            "Confusion matrix: no images".to_string()
        };
        let mut labels = vec![
            Label::new(title, (width / 2, 14), 20.0)
                .bold()
                .anchor(HPos::Center, VPos::Top),
            Label::new(
                "cells: counts; shade: share of the true class's images",
                (width / 2, 42),
                13.0,
            )
            .color(MUTED)
            .anchor(HPos::Center, VPos::Top),
        ];
        if n == 0 {
            return Ok(labels);
        }

        let label_size = if n <= 10 { 15.0 } else { 13.0 };
        let names: Vec<String> = classes
            .iter()
            .map(|c| fit_label(fonts, c, label_size, 170.0))
            .collect();
        let label_w = names
            .iter()
            .map(|l| fonts.width(l, label_size, false).ceil() as i32)
            .max()
            .unwrap_or(0);
        const AXIS_TITLE: i32 = 24;
        let (left, top) = (12 + AXIS_TITLE + label_w + 12, 70);
        let (right, bottom) = (24, 10 + label_w + 12 + AXIS_TITLE + 10);
        let (avail_w, avail_h) = (width - left - right, height - top - bottom);
        let cell = (avail_w.min(avail_h) / n as i32).clamp(4, 220);
        let grid = cell * n as i32;
        let x0 = left + (avail_w - grid).max(0) / 2;
        let y0 = top + (avail_h - grid).max(0) / 2;

        // Cells, with counts in one size that fits the widest.
        let widest = matrix
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(0)
            .to_string();
        let mut count_size = (cell as f32 * 0.38).clamp(7.0, 24.0);
        while count_size > 7.0 && fonts.width(&widest, count_size, false) > (cell - 6) as f32 {
            count_size -= 0.5;
        }
        for (i, row) in matrix.iter().enumerate() {
            let row_total: u64 = row.iter().sum();
            for (j, &count) in row.iter().enumerate() {
                let share = if row_total > 0 {
                    count as f64 / row_total as f64
                } else {
                    0.0
                };
                let (cx, cy) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
                root.draw(&Rectangle::new(
                    [(cx, cy), (cx + cell, cy + cell)],
                    blues(share).filled(),
                ))
                .map_err(plot_err)?;
                let ink = if share > 0.5 { WHITE } else { INK };
                labels.push(
                    Label::new(
                        count.to_string(),
                        (cx + cell / 2, cy + cell / 2),
                        count_size,
                    )
                    .color(ink),
                );
            }
        }
        root.draw(&Rectangle::new([(x0, y0), (x0 + grid, y0 + grid)], AXIS))
            .map_err(plot_err)?;

        // Class names: true classes left of the rows, predicted classes under the columns
        // (reading upwards), then the axis titles.
        for (k, name) in names.iter().enumerate() {
            let mid = k as i32 * cell + cell / 2;
            labels.push(
                Label::new(name.as_str(), (x0 - 8, y0 + mid), label_size)
                    .anchor(HPos::Right, VPos::Center),
            );
            labels.push(
                Label::new(name.as_str(), (x0 + mid, y0 + grid + 8), label_size)
                    .anchor(HPos::Right, VPos::Center)
                    .vertical(),
            );
        }
        labels.push(
            Label::new(
                "predicted class",
                (x0 + grid / 2, y0 + grid + 8 + label_w + 12),
                16.0,
            )
            .bold()
            .anchor(HPos::Center, VPos::Top),
        );
        labels.push(
            Label::new(
                "true class",
                (x0 - 8 - label_w - 12 - AXIS_TITLE / 2, y0 + grid / 2),
                16.0,
            )
            .bold()
            .vertical(),
        );
        Ok(labels)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<EpochMetrics> {
        let mut rows = Vec::new();
        for epoch in 1..=12 {
            let e = epoch as f64;
            rows.push(EpochMetrics {
                epoch,
                split: "train".into(),
                loss: 2.3 * (-e / 4.0).exp() + 0.1,
                acc1: 1.0 - 0.9 * (-e / 3.0).exp(),
                acc5: Some(1.0 - 0.5 * (-e / 2.0).exp()),
                lr: 0.1 * (1.0 + (std::f64::consts::PI * e / 12.0).cos()) / 2.0,
                seconds: 12.5,
            });
            rows.push(EpochMetrics {
                epoch,
                split: "val".into(),
                loss: 2.3 * (-e / 5.0).exp() + 0.3,
                acc1: 0.93 - 0.8 * (-e / 3.5).exp(),
                acc5: None,
                lr: f64::NAN,
                seconds: 1.25,
            });
        }
        rows
    }

    #[test]
    fn metrics_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let rows = vec![
            EpochMetrics {
                epoch: 1,
                split: "train".into(),
                loss: 2.5,
                acc1: 0.25,
                acc5: Some(0.75),
                lr: 0.1,
                seconds: 3.0,
            },
            EpochMetrics {
                epoch: 1,
                split: "val".into(),
                loss: 1.125,
                acc1: 0.5,
                acc5: None,
                lr: 1e-5,
                seconds: 0.5,
            },
        ];
        write_metrics_csv(&path, &rows).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "epoch,split,loss,acc1,acc5,lr,seconds\n\
             1,train,2.5,0.25,0.75,0.1,3\n\
             1,val,1.125,0.5,,0.00001,0.5\n"
        );
        // Rewriting replaces the file, and leaves no temporary file behind.
        write_metrics_csv(&path, &rows[..1]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn confusion_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.csv");
        let classes = vec!["cat".to_string(), "dog, big".into(), "say \"hi\"".into()];
        let matrix = vec![vec![5, 1, 0], vec![2, 7, 1], vec![0, 0, 9]];
        write_confusion_csv(&path, &classes, &matrix).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "true\\predicted,cat,\"dog, big\",\"say \"\"hi\"\"\"\n\
             cat,5,1,0\n\
             \"dog, big\",2,7,1\n\
             \"say \"\"hi\"\"\",0,0,9\n"
        );
        let e = write_confusion_csv(&path, &classes, &matrix[..2]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }

    /// Decodes a PNG and checks its size and that something dark (text, lines) was drawn.
    fn check_png(path: &Path, size: (u32, u32)) {
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), size);
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(dark > 500, "only {dark} dark pixels in {}", path.display());
    }

    #[test]
    fn curves_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        draw_curves(&path, &rows()).unwrap();
        check_png(&path, CURVES_SIZE);
        // One epoch, a diverged loss, and no rows at all still draw.
        let mut one = rows()[..2].to_vec();
        one[0].loss = f64::NAN;
        draw_curves(&path, &one).unwrap();
        check_png(&path, CURVES_SIZE);
        draw_curves(&path, &[]).unwrap();
        check_png(&path, CURVES_SIZE);
        // Set RESNET_TRAIN_PLOT_DIR to keep the figures for a look.
        if let Ok(out) = std::env::var("RESNET_TRAIN_PLOT_DIR") {
            let out = Path::new(&out);
            draw_curves(&out.join("curves.png"), &rows()).unwrap();
            draw_curves(&out.join("curves_one_epoch.png"), &one).unwrap();
            draw_curves(&out.join("curves_empty.png"), &[]).unwrap();
        }
    }

    #[test]
    fn confusion_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        let classes: Vec<String> = crate::data::CIFAR10_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect();
        let matrix: Vec<Vec<u64>> = (0..10u64)
            .map(|i| {
                (0..10u64)
                    .map(|j| {
                        if i == j {
                            850 + 10 * i
                        } else {
                            (i * 7 + j * 3) % 23
                        }
                    })
                    .collect()
            })
            .collect();
        draw_confusion(&path, &classes, &matrix).unwrap();
        check_png(&path, CONFUSION_SIZE);
        assert!(draw_confusion(&path, &classes, &matrix[..9]).is_err());

        // 20 classes with long names.
        let many: Vec<String> = (0..20)
            .map(|i| format!("a rather long class name number {i}"))
            .collect();
        let big: Vec<Vec<u64>> = (0..20)
            .map(|i| {
                (0..20)
                    .map(|j| if i == j { 12345 } else { (i + j) as u64 })
                    .collect()
            })
            .collect();
        draw_confusion(&path, &many, &big).unwrap();
        check_png(&path, CONFUSION_SIZE);
        if let Ok(out) = std::env::var("RESNET_TRAIN_PLOT_DIR") {
            let out = Path::new(&out);
            draw_confusion(&out.join("confusion10.png"), &classes, &matrix).unwrap();
            draw_confusion(&out.join("confusion20.png"), &many, &big).unwrap();
            let two = vec!["negative".to_string(), "positive".into()];
            draw_confusion(
                &out.join("confusion2.png"),
                &two,
                &[vec![40, 3], vec![0, 57]],
            )
            .unwrap();
        }
    }
}

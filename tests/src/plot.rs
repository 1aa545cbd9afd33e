//! Benchmark pictures with `plotters`: panels of grouped bars (the median
//! of the rounds) with min–max whiskers, one group per mode, the value
//! written above each whisker, and the run's parameters in a caption.
//!
//! SVG and PNG come from the same drawing code. Text is laid out (SVG) and
//! rasterised (PNG) with a TrueType font read at run time: DejaVu Sans from
//! Debian's `fonts-dejavu-core` (`cargo xtask setup` installs it), or the
//! file named by `SPRIGHT_PLOT_FONT`.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, anyhow};
use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::stats::Spread;

/// Canvas width in pixels.
pub const WIDTH: u32 = 960;
const TITLE_H: u32 = 44;
const PANEL_H: u32 = 250;
const CAPTION_LINE_H: u32 = 18;
const FONT: &str = "sans-serif";
/// Environment variable naming a TrueType font file to use instead.
pub const FONT_ENV: &str = "SPRIGHT_PLOT_FONT";
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// One bar: the median, with a whisker from min to max.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Written before the value when a group has several bars ("p99").
    pub label: Option<String>,
    pub spread: Spread,
}

/// The bars of one mode, side by side.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub color: RGBColor,
    pub bars: Vec<Bar>,
}

/// One chart: a title and a group per mode.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    /// Decimals of the values and axis labels (0: "10234", not "10234.0").
    pub decimals: usize,
    pub groups: Vec<Group>,
}

/// A picture: a title, panels one under the other, caption lines.
#[derive(Clone, Debug)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
    pub caption: Vec<String>,
}

impl Figure {
    pub fn size(&self) -> (u32, u32) {
        let panels = u32::try_from(self.panels.len()).unwrap_or(u32::MAX);
        let lines = u32::try_from(self.caption.len()).unwrap_or(u32::MAX);
        (
            WIDTH,
            TITLE_H + PANEL_H * panels + CAPTION_LINE_H * lines + 12,
        )
    }
}

/// The colour of the `i`th mode (stable across pictures).
pub fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(0x88, 0x88, 0x88),
        RGBColor(0xd9, 0x82, 0x2b),
        RGBColor(0x5b, 0x8d, 0xef),
        RGBColor(0x2c, 0xa0, 0x5a),
        RGBColor(0x9b, 0x59, 0xb6),
        RGBColor(0xc0, 0x39, 0x2b),
    ];
    C[i % C.len()]
}

/// Registers the font once; the error names the paths that were tried.
fn font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "no font for the pictures: tried {candidates:?}; install fonts-dejavu-core or set {FONT_ENV}"
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        // plotters keeps registered fonts for the process's lifetime.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable font", path.display()))?;
        Ok(path.clone())
    })
    .as_ref()
    .map(|_| ())
    .map_err(|e| anyhow!("{e}"))
}

/// Something drawn by this module: a [`Figure`] of bars or a [`Timeline`].
pub trait Picture {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws the picture on `root`.
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

impl Picture for Figure {
    fn size(&self) -> (u32, u32) {
        Figure::size(self)
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        draw(root, self)
    }
}

/// The picture as an SVG document.
pub fn svg(fig: &impl Picture) -> anyhow::Result<String> {
    font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, fig.size()).into_drawing_area();
        fig.draw_on(&root)
            .map_err(|e| anyhow!("drawing the SVG: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("writing the SVG: {e}"))?;
    }
    Ok(out)
}

/// The picture as a PNG file at `path`.
pub fn png(fig: &impl Picture, path: &Path) -> anyhow::Result<()> {
    font()?;
    let root = BitMapBackend::new(path, fig.size()).into_drawing_area();
    fig.draw_on(&root)
        .map_err(|e| anyhow!("drawing the PNG: {e}"))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
        .context("PNG")
}

/// `v` with `decimals` decimals.
pub fn number(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

/// Mixes `c` with white (`amount` 0–1) for a group's second and later bars.
fn lighter(c: RGBColor, amount: f64) -> RGBColor {
    let mix = |x: u8| {
        let v = f64::from(x) + (255.0 - f64::from(x)) * amount;
        // Clamped to 0..=255 above, so the cast is exact.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "v is within 0..=255"
        )]
        let b = v.round() as u8;
        b
    };
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

pub type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> DrawResult<DB> {
    let (areas, caption) = frame(root, &fig.title, fig.panels.len(), PANEL_H)?;
    for (area, panel) in areas.iter().zip(&fig.panels) {
        draw_panel(area, panel)?;
    }
    draw_caption(&caption, &fig.caption)
}

/// Paints the background and the title; returns one area per panel (each
/// `panel_h` high, one under the other) and the caption's area.
#[expect(
    clippy::type_complexity,
    reason = "plotters' own area type, returned once and unpacked at once"
)]
fn frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    panels: usize,
    panel_h: u32,
) -> Result<
    (Vec<DrawingArea<DB, Shift>>, DrawingArea<DB, Shift>),
    DrawingAreaErrorKind<DB::ErrorType>,
> {
    root.fill(&WHITE)?;
    let (w, _) = root.dim_in_pixel();
    let centre = i32::try_from(w / 2).unwrap_or(0);
    root.draw(&Text::new(
        title.to_owned(),
        (centre, 12),
        (FONT, 20)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let (_, rest) = root.split_vertically(TITLE_H);
    let height = panel_h * u32::try_from(panels).unwrap_or(0);
    let (area, caption) = rest.split_vertically(height);
    let areas = if panels == 0 {
        Vec::new()
    } else {
        area.split_evenly((panels, 1))
    };
    Ok((areas, caption))
}

fn draw_caption<DB: DrawingBackend>(
    caption: &DrawingArea<DB, Shift>,
    lines: &[String],
) -> DrawResult<DB> {
    for (i, line) in lines.iter().enumerate() {
        let y = i32::try_from(i).unwrap_or(0) * i32::try_from(CAPTION_LINE_H).unwrap_or(18) + 4;
        caption.draw(&Text::new(
            line.clone(),
            (16, y),
            (FONT, 13)
                .into_font()
                .color(&RGBColor(0x33, 0x33, 0x33))
                .pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> DrawResult<DB> {
    let n = panel.groups.len().max(1);
    let top = panel
        .groups
        .iter()
        .flat_map(|g| &g.bars)
        .map(|b| b.spread.max.max(b.spread.median))
        .fold(0.0_f64, f64::max);
    // Headroom above the highest whisker for its value.
    let y_max = if top > 0.0 { top * 1.25 } else { 1.0 };
    let decimals = panel.decimals;
    // Axis ticks without trailing zeros ("2", "2.5", not "2.00").
    let y_fmt = move |v: &f64| {
        let s = number(*v, decimals);
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 16))
        .margin_left(12)
        .margin_right(16)
        .margin_top(6)
        .margin_bottom(4)
        .x_label_area_size(26)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n as f64, 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(5)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 12))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
        .draw()?;
    let label_style = (FONT, 13).into_font().color(&BLACK);
    for (i, group) in panel.groups.iter().enumerate() {
        let m = group.bars.len().max(1) as f64;
        let slot = 0.8 / m;
        for (k, bar) in group.bars.iter().enumerate() {
            let x0 = i as f64 + 0.1 + k as f64 * slot + slot * 0.08;
            let x1 = x0 + slot * 0.84;
            let cx = f64::midpoint(x0, x1);
            let fill = if k == 0 {
                group.color
            } else {
                lighter(group.color, 0.45)
            };
            let s = bar.spread;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x1, s.median)],
                fill.filled(),
            )))?;
            let cap = (x1 - x0) * 0.2;
            let whisker = BLACK.stroke_width(1);
            chart.draw_series([
                PathElement::new(vec![(cx, s.min), (cx, s.max)], whisker),
                PathElement::new(vec![(cx - cap, s.min), (cx + cap, s.min)], whisker),
                PathElement::new(vec![(cx - cap, s.max), (cx + cap, s.max)], whisker),
            ])?;
            let value = match &bar.label {
                Some(l) => format!("{l} {}", number(s.median, decimals)),
                None => number(s.median, decimals),
            };
            chart.draw_series(std::iter::once(
                EmptyElement::at((cx, s.max.max(s.median)))
                    + Text::new(
                        value,
                        (0, -4),
                        label_style.pos(Pos::new(HPos::Center, VPos::Bottom)),
                    ),
            ))?;
        }
        // The mode's name under its group, in the x label area.
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let (ax, ay) = area.get_base_pixel();
        area.draw(&Text::new(
            group.name.clone(),
            (px - ax, py - ay + 6),
            label_style.pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    Ok(())
}

/// One line of a [`Timeline`] panel: `(seconds, value)` points.
#[derive(Clone, Debug)]
pub struct Line {
    pub name: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a [`Timeline`]: lines over the shared time axis.
#[derive(Clone, Debug)]
pub struct LinePanel {
    pub title: String,
    /// Decimals of the axis labels.
    pub decimals: usize,
    pub lines: Vec<Line>,
}

/// A picture of values over time (a soak run): panels one under the other
/// on one time axis, thin vertical marks at moments worth seeing (the
/// steps of a schedule), caption lines.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub title: String,
    pub panels: Vec<LinePanel>,
    /// Seconds at which a vertical mark is drawn in every panel.
    pub marks: Vec<f64>,
    pub caption: Vec<String>,
}

const LINE_PANEL_H: u32 = 190;

impl Picture for Timeline {
    fn size(&self) -> (u32, u32) {
        let panels = u32::try_from(self.panels.len()).unwrap_or(u32::MAX);
        let lines = u32::try_from(self.caption.len()).unwrap_or(u32::MAX);
        (
            WIDTH,
            TITLE_H + LINE_PANEL_H * panels + CAPTION_LINE_H * lines + 12,
        )
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (areas, caption) = frame(root, &self.title, self.panels.len(), LINE_PANEL_H)?;
        let x_max = self
            .panels
            .iter()
            .flat_map(|p| &p.lines)
            .flat_map(|l| &l.points)
            .map(|p| p.0)
            .fold(1.0_f64, f64::max);
        for (area, panel) in areas.iter().zip(&self.panels) {
            draw_line_panel(area, panel, x_max, &self.marks)?;
        }
        draw_caption(&caption, &self.caption)
    }
}

fn draw_line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &LinePanel,
    x_max: f64,
    marks: &[f64],
) -> DrawResult<DB> {
    let top = panel
        .lines
        .iter()
        .flat_map(|l| &l.points)
        .map(|p| p.1)
        .fold(0.0_f64, f64::max);
    // Whole-number panels (counts) get at least 0–4, so no two axis
    // labels round to the same number.
    let floor = if panel.decimals == 0 { 4.0 } else { 1.0 };
    let y_max = (top * 1.15).max(floor);
    let decimals = panel.decimals;
    let y_fmt = move |v: &f64| number(*v, decimals);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 15))
        .margin_left(12)
        .margin_right(16)
        .margin_top(4)
        .margin_bottom(4)
        .x_label_area_size(24)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_labels(10)
        .x_label_formatter(&|v: &f64| format!("{v:.0} s"))
        .y_labels(4)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 12))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xe4, 0xe4, 0xe4))
        .draw()?;
    let mark = RGBColor(0xc8, 0xc8, 0xc8).stroke_width(1);
    chart.draw_series(
        marks
            .iter()
            .map(|&t| PathElement::new(vec![(t, 0.0), (t, y_max)], mark)),
    )?;
    for line in &panel.lines {
        let color = line.color;
        chart
            .draw_series(std::iter::once(PathElement::new(
                line.points.clone(),
                color.stroke_width(2),
            )))?
            .label(line.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    if panel.lines.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xc8, 0xc8, 0xc8))
            .draw()?;
    }
    Ok(())
}

/// The tests' check of a rendered SVG: well-formed, and no two texts on
/// top of each other (by an estimate of each text's box).
#[cfg(test)]
pub(crate) mod svg_check {
    use anyhow::Context as _;

    /// A text element of an SVG as a box, for the overlap check of the tests:
    /// plotters writes `x`, `y`, `font-size`, `text-anchor` and a `dy` that
    /// moves the baseline (`0.76em` top-aligned, `0.5ex` centred, `-0.5ex`
    /// bottom-aligned).
    #[derive(Clone, Debug, PartialEq)]
    pub(crate) struct TextBox {
        pub text: String,
        pub x0: f64,
        pub y0: f64,
        pub x1: f64,
        pub y1: f64,
    }

    /// Average advance of a character in em, on the generous side for DejaVu
    /// Sans (digits are 0.64 em, lower-case letters 0.3–0.7 em).
    pub(crate) const EM_PER_CHAR: f64 = 0.62;

    impl TextBox {
        /// The estimated box of a `<text>` element: width = characters ×
        /// [`EM_PER_CHAR`] × font-size, shifted by the anchor; height from
        /// 0.76 em above the baseline (cap height with a margin) to 0.24 em
        /// below (descenders). An ex is taken as half an em. None for
        /// elements without coordinates; rotated text is not estimated (Err).
        pub(crate) fn of(node: roxmltree::Node<'_, '_>) -> anyhow::Result<Option<Self>> {
            let num = |name: &str| node.attribute(name).and_then(|v| v.parse::<f64>().ok());
            let (Some(x), Some(y)) = (num("x"), num("y")) else {
                return Ok(None);
            };
            anyhow::ensure!(
                node.attribute("transform").is_none(),
                "rotated text is not estimated: {:?}",
                node.text()
            );
            let size = num("font-size").unwrap_or(16.0);
            let text = node.text().unwrap_or_default().trim().to_owned();
            let width = text.chars().count() as f64 * EM_PER_CHAR * size;
            let dy = node.attribute("dy").map_or(Ok(0.0), |d| {
                if let Some(em) = d.strip_suffix("em") {
                    em.parse::<f64>().map(|v| v * size)
                } else if let Some(ex) = d.strip_suffix("ex") {
                    ex.parse::<f64>().map(|v| v * size / 2.0)
                } else {
                    d.parse::<f64>()
                }
                .with_context(|| format!("dy {d:?}"))
            })?;
            let x0 = match node.attribute("text-anchor") {
                Some("middle") => x - width / 2.0,
                Some("end") => x - width,
                _ => x,
            };
            let baseline = y + dy;
            Ok(Some(Self {
                text,
                x0,
                y0: baseline - 0.76 * size,
                x1: x0 + width,
                y1: baseline + 0.24 * size,
            }))
        }

        pub(crate) fn overlaps(&self, other: &Self) -> bool {
            self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
        }
    }

    /// The boxes of every `<text>` of an SVG document.
    pub(crate) fn text_boxes(svg: &str) -> anyhow::Result<Vec<TextBox>> {
        let doc = roxmltree::Document::parse(svg).context("parsing the SVG")?;
        let mut out = Vec::new();
        for node in doc.descendants().filter(|n| n.has_tag_name("text")) {
            out.extend(TextBox::of(node)?);
        }
        Ok(out)
    }

    /// Panics unless no two texts overlap and every text is inside the
    /// figure's canvas.
    pub(crate) fn assert_readable(fig: &super::Figure, boxes: &[TextBox]) {
        let overlaps = overlapping(boxes);
        assert!(overlaps.is_empty(), "overlapping texts: {overlaps:?}");
        let (w, h) = fig.size();
        for b in boxes {
            assert!(
                b.x0 >= 0.0 && b.x1 <= f64::from(w) && b.y0 >= 0.0 && b.y1 <= f64::from(h),
                "{b:?} leaves the {w}×{h} canvas"
            );
        }
    }

    /// Pairs of text boxes that overlap, by their texts.
    pub(crate) fn overlapping(boxes: &[TextBox]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                if a.overlaps(b) {
                    out.push((a.text.clone(), b.text.clone()));
                }
            }
        }
        out
    }
}

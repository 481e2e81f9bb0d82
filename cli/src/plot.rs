//! `--plot FILE.png` of `kvcache load`: a picture a reader understands without the README.
//!
//! A title with the run's parameters (scenario, model, loop and its concurrency or rate,
//! context); top panel latency per second (p50 and p99, in ms), bottom panel throughput
//! (requests per second); both over time since the start, with ticks and values on every axis,
//! a light grid, and legends placed above the panels, clear of the data. Text uses the public
//! domain 8×8 bitmap font of the `font8x8` crate, so no font files are needed.

use crate::load::Second;
use font8x8::UnicodeFonts;
use std::path::Path;

const W: i64 = 960;
const H: i64 = 640;
/// Plot area left and right edges (room for the y tick labels on the left).
const LEFT: i64 = 90;
const RIGHT: i64 = W - 40;

const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [225, 225, 225];
const P50: [u8; 3] = [30, 80, 200];
const P99: [u8; 3] = [200, 30, 30];
const RPS: [u8; 3] = [20, 140, 60];

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W).contains(&x) && (0..H).contains(&y) {
            self.px[(y * W + x) as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
                self.set(x + 1, y, c);
            }
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for dy in 0..h {
            for dx in 0..w {
                self.set(x + dx, y + dy, c);
            }
        }
    }

    /// Width in pixels of `s` at `scale`.
    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }

    /// `s` with its top-left corner at (x, y), each 8×8 glyph scaled by `scale`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let Some(rows) = font8x8::BASIC_FONTS.get(ch) else { continue };
            for (r, bits) in rows.iter().enumerate() {
                for b in 0..8 {
                    // Bit 0 is the leftmost pixel.
                    if bits & (1 << b) != 0 {
                        self.rect(x + (k as i64 * 8 + b) * scale, y + r as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `ticks` intervals up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One panel: axes, grid, ticks, its title above the y axis, a legend above its right end, and
/// the series (values per second).
struct Panel<'a> {
    top: i64,
    bottom: i64,
    title: &'a str,
    series: &'a [(&'a str, &'a [f64], [u8; 3])],
}

fn draw_panel(c: &mut Canvas, p: &Panel, seconds: usize) {
    let (t, b) = (p.top, p.bottom);
    let max = p.series.iter().flat_map(|s| s.1.iter().copied()).fold(0.0f64, f64::max);
    let step = nice_step(if max > 0.0 { max } else { 1.0 }, 4.0);
    // Headroom above the largest value, so a flat line never runs along the top edge.
    let top_value = (max * 1.05 / step).ceil().max(1.0) * step;
    let y_of = |v: f64| b - ((b - t) as f64 * (v / top_value)).round() as i64;
    let span = seconds.max(2) - 1;
    let x_of = |i: usize| LEFT + (RIGHT - LEFT) * i as i64 / span as i64;
    // Horizontal grid and y ticks.
    let mut v = 0.0;
    while v <= top_value + step / 2.0 {
        let y = y_of(v);
        c.line((LEFT, y), (RIGHT, y), GRID, false);
        c.line((LEFT - 5, y), (LEFT, y), BLACK, false);
        let label = tick_label(v, step);
        c.text(LEFT - 10 - Canvas::text_width(&label, 1), y - 4, &label, 1, BLACK);
        v += step;
    }
    // Vertical grid and x ticks (seconds since the start).
    let xstep = nice_step(span as f64, 8.0).max(1.0) as usize;
    for s in (0..=span).step_by(xstep) {
        let x = x_of(s);
        c.line((x, t), (x, b), GRID, false);
        c.line((x, b), (x, b + 5), BLACK, false);
        let label = s.to_string();
        c.text(x - Canvas::text_width(&label, 1) / 2, b + 9, &label, 1, BLACK);
    }
    c.line((LEFT, t), (LEFT, b), BLACK, false);
    c.line((LEFT, b), (RIGHT, b), BLACK, false);
    // Axis title above the y axis; legend above the right end: neither overlaps the data.
    c.text(LEFT - 60, t - 22, p.title, 1, BLACK);
    let mut x = RIGHT;
    for (name, _, color) in p.series.iter().rev() {
        x -= Canvas::text_width(name, 1) + 26;
        c.rect(x, t - 20, 16, 4, *color);
        c.text(x + 20, t - 22, name, 1, BLACK);
        x -= 14;
    }
    for (_, ys, color) in p.series {
        let pts: Vec<(i64, i64)> = ys.iter().enumerate().map(|(i, v)| (x_of(i), y_of(*v))).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], *color, true);
        }
        if let [only] = pts[..] {
            c.rect(only.0 - 2, only.1 - 2, 5, 5, *color);
        }
    }
}

/// Draw `timeline` into a PNG at `path`, titled with `title` (the run's parameters) and
/// `subtitle` (its totals).
pub fn draw(timeline: &[Second], title: &str, subtitle: &str, path: &Path) -> anyhow::Result<()> {
    let mut c = Canvas { px: vec![[255, 255, 255]; (W * H) as usize] };
    c.text((W - Canvas::text_width(title, 2)) / 2, 12, title, 2, BLACK);
    c.text((W - Canvas::text_width(subtitle, 1)) / 2, 36, subtitle, 1, BLACK);
    let p50: Vec<f64> = timeline.iter().map(|s| s.p50_ms).collect();
    let p99: Vec<f64> = timeline.iter().map(|s| s.p99_ms).collect();
    let rps: Vec<f64> = timeline.iter().map(|s| s.requests as f64).collect();
    draw_panel(
        &mut c,
        &Panel {
            top: 90,
            bottom: 330,
            title: "latency per second (ms)",
            series: &[("p50", &p50, P50), ("p99", &p99, P99)],
        },
        timeline.len(),
    );
    draw_panel(
        &mut c,
        &Panel {
            top: 390,
            bottom: 580,
            title: "throughput (requests/s)",
            series: &[("completed requests/s", &rps, RPS)],
        },
        timeline.len(),
    );
    let xl = "time since start (s)";
    c.text((LEFT + RIGHT - Canvas::text_width(xl, 1)) / 2, H - 24, xl, 1, BLACK);
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    let data: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(10.0, 4.0), 5.0);
        assert_eq!(nice_step(7.3, 4.0), 2.0);
        assert_eq!(nice_step(0.37, 4.0), 0.1);
        assert_eq!(nice_step(1800.0, 4.0), 500.0);
        assert_eq!(tick_label(2.5, 0.5), "2.5");
    }
}

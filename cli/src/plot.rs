//! `--plot FILE.png` of `kvcache load`: latency percentiles (top: p50 blue, p99 red) and
//! throughput (bottom, green) per second, each panel labelled with its maximum (a 3×5 pixel
//! digit font, so no font files are needed).

use crate::load::Second;
use std::path::Path;

const W: usize = 800;
const H: usize = 500;
const MARGIN: usize = 40;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }

    /// Digits, '.', and letters drawn as 3×5 glyphs scaled by 2.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        const GLYPHS: [(char, [u8; 5]); 13] = [
            ('0', [7, 5, 5, 5, 7]),
            ('1', [2, 6, 2, 2, 7]),
            ('2', [7, 1, 7, 4, 7]),
            ('3', [7, 1, 7, 1, 7]),
            ('4', [5, 5, 7, 1, 1]),
            ('5', [7, 4, 7, 1, 7]),
            ('6', [7, 4, 7, 5, 7]),
            ('7', [7, 1, 1, 1, 1]),
            ('8', [7, 5, 7, 5, 7]),
            ('9', [7, 5, 7, 1, 7]),
            ('.', [0, 0, 0, 0, 2]),
            ('/', [1, 1, 2, 4, 4]),
            (' ', [0, 0, 0, 0, 0]),
        ];
        for (k, ch) in s.chars().enumerate() {
            let Some((_, rows)) = GLYPHS.iter().find(|g| g.0 == ch) else { continue };
            for (r, bits) in rows.iter().enumerate() {
                for b in 0..3 {
                    if bits & (4 >> b) != 0 {
                        for dy in 0..2 {
                            for dx in 0..2 {
                                self.set(x + k as i64 * 8 + b * 2 + dx, y + r as i64 * 2 + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    fn panel(&mut self, top: usize, bottom: usize, series: &[(&[f64], [u8; 3])]) {
        let (l, r) = (MARGIN as i64, (W - 10) as i64);
        let (t, b) = (top as i64, bottom as i64);
        let axis = [0, 0, 0];
        self.line((l, t), (l, b), axis);
        self.line((l, b), (r, b), axis);
        let max = series.iter().flat_map(|s| s.0.iter().copied()).fold(0.0f64, f64::max).max(1e-9);
        self.text(l + 6, t, &format!("{max:.2}"), axis);
        for (ys, c) in series {
            let n = ys.len().max(2) - 1;
            let pts: Vec<(i64, i64)> = ys
                .iter()
                .enumerate()
                .map(|(i, y)| (l + (r - l) * i as i64 / n as i64, b - ((b - t) as f64 * (y / max)) as i64))
                .collect();
            for w in pts.windows(2) {
                self.line(w[0], w[1], *c);
            }
        }
    }
}

/// Draw `timeline` into a PNG at `path`.
pub fn draw(timeline: &[Second], path: &Path) -> anyhow::Result<()> {
    let mut c = Canvas { px: vec![[255, 255, 255]; W * H] };
    let p50: Vec<f64> = timeline.iter().map(|s| s.p50_ms).collect();
    let p99: Vec<f64> = timeline.iter().map(|s| s.p99_ms).collect();
    let rps: Vec<f64> = timeline.iter().map(|s| s.requests as f64).collect();
    c.panel(20, H / 2 - 20, &[(&p99, [200, 30, 30]), (&p50, [30, 60, 200])]);
    c.panel(H / 2 + 20, H - 20, &[(&rps, [30, 150, 60])]);
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    let data: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&data)?;
    Ok(())
}

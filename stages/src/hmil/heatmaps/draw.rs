//! The heatmap picture of one slide: a panel per class side by side, each patch coloured by its
//! value (viridis) over the slide or a blank canvas, under a banner, with a colour bar.

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use super::maps::Placement;
use crate::error::{Error, Result};

/// Side of a panel's longer edge, in pixels.
const PANEL: f64 = 256.0;
/// Margins around and between panels, the banner's and titles' heights, the colour bar's column.
const GAP: u32 = 8;
const BANNER: u32 = 28;
const TITLE: u32 = 20;
const BAR: u32 = 48;
/// Opacity of the colour over the slide.
const ALPHA: f64 = 0.7;

/// Where a picture's parts are: `panels` panels of `width` × `height` pixels showing the
/// level-0 box from `origin` at `scale` level-0 pixels per pixel, and the colour bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub origin: (f64, f64),
    pub scale: f64,
    pub width: u32,
    pub height: u32,
    pub panels: usize,
}

impl Layout {
    /// The layout of `panels` panels over the patches of `placement`, with half a patch of margin.
    pub fn new(placement: &Placement, panels: usize) -> Layout {
        let (l, t, r, b) = placement.extent();
        let margin = placement.size / 2.0;
        let (l, t, r, b) = (l - margin, t - margin, r + margin, b + margin);
        let scale = (r - l).max(b - t) / PANEL;
        let (width, height) = (((r - l) / scale).ceil() as u32, ((b - t) / scale).ceil() as u32);
        Layout { origin: (l, t), scale, width: width.max(1), height: height.max(1), panels }
    }

    /// Left edge of panel `k`.
    pub fn panel_x(&self, k: usize) -> u32 {
        GAP + k as u32 * (self.width + GAP)
    }

    /// Top edge of every panel.
    pub fn panel_y(&self) -> u32 {
        BANNER + TITLE
    }

    /// The pixel of the level-0 point (`x`, `y`) in panel `k`, when the panel shows it.
    pub fn pixel(&self, k: usize, x: f64, y: f64) -> Option<(u32, u32)> {
        let (px, py) = ((x - self.origin.0) / self.scale, (y - self.origin.1) / self.scale);
        (px >= 0.0 && py >= 0.0 && px < f64::from(self.width) && py < f64::from(self.height))
            .then(|| (self.panel_x(k) + px as u32, self.panel_y() + py as u32))
    }

    /// The whole picture's size.
    fn size(&self) -> (u32, u32) {
        (self.panels as u32 * (self.width + GAP) + GAP + BAR, BANNER + TITLE + self.height + 16)
    }

    /// Left edge of the colour bar.
    fn bar_x(&self) -> u32 {
        self.size().0 - BAR + 8
    }

    /// The level-0 box the panels show: (left, top, right, bottom).
    pub fn extent(&self) -> (f64, f64, f64, f64) {
        let (w, h) = (f64::from(self.width) * self.scale, f64::from(self.height) * self.scale);
        (self.origin.0, self.origin.1, self.origin.0 + w, self.origin.1 + h)
    }
}

/// One panel: its title and a value in 0–1 per patch.
pub struct Panel<'a> {
    pub title: String,
    pub values: &'a [f64],
}

/// The picture: `panels` side by side, each the patches of `placement` coloured by value over
/// `background` (the panels' box, [`Layout::extent`], at the panels' size; white when none),
/// under `banner`, with a colour bar from 0% to 100%.
pub fn render(
    placement: &Placement,
    panels: &[Panel],
    banner: &str,
    background: impl FnOnce(&Layout) -> Option<RgbImage>,
) -> Result<RgbImage> {
    let layout = Layout::new(placement, panels.len());
    let (pw, ph) = (layout.width, layout.height);
    let base = background(&layout)
        .map(|b| crate::pixels::resize(&b, pw, ph))
        .unwrap_or_else(|| RgbImage::from_pixel(pw, ph, Rgb([255, 255, 255])));
    let (width, height) = layout.size();
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let side = (placement.size / layout.scale).ceil().max(1.0) as u32;
    for (k, panel) in panels.iter().enumerate() {
        let mut p = base.clone();
        for (&(x, y), &v) in placement.corners.iter().zip(panel.values) {
            let colour = ViridisRGB::get_color(v);
            let (x0, y0) = ((x - layout.origin.0) / layout.scale, (y - layout.origin.1) / layout.scale);
            let (x0, y0) = (x0.max(0.0) as u32, y0.max(0.0) as u32);
            for py in y0..(y0 + side).min(ph) {
                for px in x0..(x0 + side).min(pw) {
                    let under = p.get_pixel(px, py).0;
                    p.put_pixel(px, py, Rgb(blend([colour.0, colour.1, colour.2], under, ALPHA)));
                }
            }
        }
        image::imageops::replace(&mut canvas, &p, i64::from(layout.panel_x(k)), i64::from(layout.panel_y()));
    }
    for py in 0..ph {
        let colour = ViridisRGB::get_color(1.0 - f64::from(py) / f64::from(ph.max(2) - 1));
        for px in layout.bar_x()..layout.bar_x() + 12 {
            canvas.put_pixel(px, layout.panel_y() + py, Rgb([colour.0, colour.1, colour.2]));
        }
    }
    label(&mut canvas, panels, &layout, banner)?;
    Ok(canvas)
}

/// `over` laid on `under` with opacity `alpha`.
pub fn blend(over: [u8; 3], under: [u8; 3], alpha: f64) -> [u8; 3] {
    [0, 1, 2].map(|i| (alpha * f64::from(over[i]) + (1.0 - alpha) * f64::from(under[i])).round() as u8)
}

/// Writes the banner, each panel's title and the colour bar's ends onto `canvas`.
fn label(canvas: &mut RgbImage, panels: &[Panel], layout: &Layout, banner: &str) -> Result<()> {
    crate::report::register_font();
    let (w, h) = canvas.dimensions();
    let err = |e: &dyn std::fmt::Display| Error::Features(format!("drawing a heatmap: {e}"));
    let root = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
    let font = |px: u32| ("sans-serif", px).into_font().color(&BLACK);
    root.draw_text(banner, &font(15), (GAP as i32, 6)).map_err(|e| err(&e))?;
    for (k, panel) in panels.iter().enumerate() {
        let x = layout.panel_x(k) as i32;
        root.draw_text(&panel.title, &font(13), (x, (BANNER + 3) as i32)).map_err(|e| err(&e))?;
    }
    let (x, y) = (layout.bar_x() as i32, layout.panel_y() as i32);
    root.draw_text("100%", &font(11), (x - 6, y - 13)).map_err(|e| err(&e))?;
    root.draw_text("0%", &font(11), (x, y + layout.height as i32 + 1)).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_region_is_drawn_where_its_patches_are() {
        // A 4 × 4 grid of 256-pixel patches; the value high on the left column only.
        let corners: Vec<(f64, f64)> = (0..16).map(|i| (f64::from(i % 4) * 256.0, f64::from(i / 4) * 256.0)).collect();
        let values: Vec<f64> = corners.iter().map(|(x, _)| if *x == 0.0 { 1.0 } else { 0.0 }).collect();
        let placement = Placement { corners, size: 256.0 };
        let panel = Panel { title: "IC 0.90".into(), values: &values };
        let picture = render(&placement, &[panel], "slide: true IC", |_| None).unwrap();
        let layout = Layout::new(&placement, 1);
        let at =
            |x: f64, y: f64| picture.get_pixel(layout.pixel(0, x, y).unwrap().0, layout.pixel(0, x, y).unwrap().1).0;
        let (hot, cold, margin) = (at(128.0, 400.0), at(700.0, 400.0), at(-100.0, 400.0));
        // Viridis: yellow at the top, purple at the bottom (blended with white).
        assert!(hot[0] > 200 && hot[1] > 200 && hot[2] < 120, "hot {hot:?}");
        assert!(cold[0] < 150 && cold[2] > 120, "cold {cold:?}");
        assert_eq!(margin, [255, 255, 255], "half a patch of margin around the patches");
        assert_eq!(layout.pixel(0, -200.0, 0.0), None, "outside the panel");
    }

    #[test]
    fn the_background_is_the_box_the_panels_show() {
        // Patches in a block away from the origin: the panels show that block, not the slide's
        // corner, and the background is asked for exactly that box.
        let placement = Placement { corners: vec![(1000.0, 2000.0), (1100.0, 2000.0)], size: 100.0 };
        let mut asked = None;
        render(&placement, &[Panel { title: String::new(), values: &[0.0, 1.0] }], "", |l| {
            asked = Some(l.extent());
            None
        })
        .unwrap();
        let (l, t, r, b) = asked.unwrap();
        assert!((l - 950.0).abs() < 1e-9 && (t - 1950.0).abs() < 1e-9, "{asked:?}");
        assert!(r >= 1250.0 && b >= 2150.0 && r - l < 400.0, "{asked:?}");
    }
}

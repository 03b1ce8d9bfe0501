//! Resizing pictures: bilinear convolution with SIMD (fast_image_resize), whose kernel widens
//! with the scale, so that a large reduction averages every pixel instead of skipping most.

use image::RgbImage;

/// `image` resized to `width` × `height` (each at least 1).
pub fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
    let (width, height) = (width.max(1), height.max(1));
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let src = Image::from_vec_u8(image.width(), image.height(), image.as_raw().clone(), PixelType::U8x3)
        .expect("an RGB image holds width × height × 3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new().resize(&src, &mut dst, &options).expect("same pixel types");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("width × height × 3 bytes")
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    #[test]
    fn a_reduction_averages_every_pixel() {
        // Alternating black and white columns: reduced eightfold, they average to grey, where
        // sampling would give black or white.
        let image =
            image::RgbImage::from_fn(64, 16, |x, _| if x % 2 == 0 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) });
        let small = super::resize(&image, 8, 2);
        assert_eq!(small.dimensions(), (8, 2));
        assert!(small.pixels().all(|p| (100..=155).contains(&p.0[0])), "{:?}", small.get_pixel(0, 0));
    }
}

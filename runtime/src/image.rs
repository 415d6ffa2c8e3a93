//! Pictures and videos as people and browsers take them: 8-bit RGB from the pipelines'
//! planes in [0, 1], PNG files and looping animated PNGs (which browsers play). The CLI's
//! files and the browser page use these same functions, so the two frontends agree byte for
//! byte on the same model output.

use crate::error::{Error, Result};

/// `[3, h, w]` values in [0, 1] (`plane` = h * w) as interleaved 8-bit RGB, rounded to nearest.
pub fn rgb8(chw: &[f32], plane: usize) -> Vec<u8> {
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| (chw[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8))
        .collect()
}

/// Frame `f` `[3, h, w]` of a video `[3, frames, h, w]` (`plane` = h * w).
pub fn frame_planes(video: &[f32], frames: usize, f: usize, plane: usize) -> Vec<f32> {
    (0..3)
        .flat_map(|c| video[(c * frames + f) * plane..][..plane].iter().copied())
        .collect()
}

fn png_err(e: png::EncodingError) -> Error {
    Error::Invalid(format!("PNG encoding: {e}"))
}

/// A video `[3, frames, h, w]` in [0, 1] as an 8-bit RGB PNG, animated (looping at `fps`)
/// when it has more than one frame, with `parameters` in a text chunk.
pub fn png(video: &[f32], frames: usize, width: usize, height: usize, fps: u16, parameters: &str) -> Result<Vec<u8>> {
    let plane = width * height;
    if frames == 0 || video.len() != 3 * frames * plane {
        return Err(Error::Invalid(format!(
            "PNG encoding: {} values for {frames} frames of {width}x{height}",
            video.len()
        )));
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk("parameters".into(), parameters.into()).map_err(png_err)?;
    if frames > 1 {
        enc.set_animated(frames as u32, 0).map_err(png_err)?;
        enc.set_frame_delay(1, fps.max(1)).map_err(png_err)?;
    }
    let mut writer = enc.write_header().map_err(png_err)?;
    for f in 0..frames {
        writer
            .write_image_data(&rgb8(&frame_planes(video, frames, f, plane), plane))
            .map_err(png_err)?;
    }
    writer.finish().map_err(png_err)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_interleave_and_round() {
        // Two pixels: red channel 0 and 1, green 0.5 and 0.002, blue out of range both ways.
        let chw = [0.0, 1.0, 0.5, 0.002, -0.3, 1.7];
        assert_eq!(rgb8(&chw, 2), vec![0, 128, 0, 255, 1, 255]);
    }

    #[test]
    fn frames_are_cut_from_the_channel_major_video() {
        // [3 channels, 2 frames, 1 pixel]: frame 1 is every channel's second value.
        let video = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(frame_planes(&video, 2, 1, 1), vec![1.0, 3.0, 5.0]);
    }

    #[test]
    fn one_frame_is_a_still_png_and_more_are_animated() {
        let still = png(&[0.5; 3 * 4], 1, 2, 2, 16, "p").unwrap();
        assert!(still.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(!still.windows(4).any(|w| w == b"acTL"));
        let clip = png(&[0.5; 3 * 3 * 4], 3, 2, 2, 16, "p").unwrap();
        assert!(clip.windows(4).any(|w| w == b"acTL"));
        assert!(png(&[0.5; 5], 1, 2, 2, 16, "p").is_err());
    }
}

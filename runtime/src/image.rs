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

/// What produced a picture, for the `parameters` text chunk of its PNG (the convention
/// image tools read: prompt, then a line of settings).
pub struct Parameters<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: usize,
    pub sampler: &'a str,
    pub cfg_scale: f32,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Video length; none for a picture.
    pub frames: Option<usize>,
    pub model: &'a str,
    pub backend: &'a str,
}

impl std::fmt::Display for Parameters<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Backend: {}",
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.backend
        )?;
        if let Some(frames) = self.frames {
            write!(f, ", Frames: {frames}")?;
        }
        Ok(())
    }
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
    // fdeflate: a full-size video's frames encode in a fraction of the default level's time
    // at nearly the same size (the `video:` line of `sdlite gen` reports the time).
    enc.set_compression(png::Compression::Fast);
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
    fn parameters_read_like_other_tools_write_them() {
        let mut p = Parameters {
            prompt: "a red star",
            negative_prompt: "",
            steps: 4,
            sampler: "euler",
            cfg_scale: 7.5,
            seed: 7,
            width: 64,
            height: 32,
            frames: None,
            model: "sd-tiny",
            backend: "cpu",
        };
        assert_eq!(
            p.to_string(),
            "a red star\nNegative prompt: \nSteps: 4, Sampler: euler, CFG scale: 7.5, Seed: 7, Size: 64x32, Model: sd-tiny, Backend: cpu"
        );
        p.frames = Some(9);
        assert!(p.to_string().ends_with("Backend: cpu, Frames: 9"));
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

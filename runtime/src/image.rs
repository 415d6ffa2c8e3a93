//! Pictures as people and browsers take them: 8-bit RGB from the pipelines' `[3, h, w]`
//! planes in [0, 1]. The CLI's PNGs and the browser's canvas use this one conversion, so the
//! two frontends agree pixel for pixel on the same model output.

/// `[3, h, w]` values in [0, 1] (`plane` = h * w) as interleaved 8-bit RGB, rounded to nearest.
pub fn rgb8(chw: &[f32], plane: usize) -> Vec<u8> {
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| (chw[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8))
        .collect()
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
}

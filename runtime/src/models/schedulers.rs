//! Samplers for Stable Diffusion, following diffusers' schedulers step for step: DDIM (eta 0),
//! Euler, Euler ancestral and DPM++ 2M. They work on host `f32` latents: a few hundred
//! kilobytes per step, and the arithmetic then matches the reference's float32 exactly.

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
}

impl Sampler {
    pub const NAMES: [&'static str; 4] = ["ddim", "euler", "euler_a", "dpmpp_2m"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "ddim" => Sampler::Ddim,
            "euler" => Sampler::Euler,
            "euler_a" => Sampler::EulerAncestral,
            "dpmpp_2m" => Sampler::DpmPp2m,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown sampler `{other}` (choose one of {})",
                    Sampler::NAMES.join(", ")
                )))
            }
        })
    }

    /// diffusers' default `timestep_spacing` for this scheduler class.
    fn default_spacing(self) -> Spacing {
        match self {
            Sampler::Ddim => Spacing::Leading,
            _ => Spacing::Linspace,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// Mirrors diffusers' `scheduler_config.json` (the fields these samplers read).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d::num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d::beta_start")]
    pub beta_start: f64,
    #[serde(default = "d::beta_end")]
    pub beta_end: f64,
    #[serde(default = "d::beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "d::clip_sample_range")]
    pub clip_sample_range: f32,
    #[serde(default = "d::prediction_type")]
    pub prediction_type: Prediction,
    /// `None`: the sampler class's own default, as `from_config` gives it.
    #[serde(default)]
    pub timestep_spacing: Option<Spacing>,
}

mod d {
    pub fn num_train_timesteps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        0.00085
    }
    pub fn beta_end() -> f64 {
        0.012
    }
    pub fn beta_schedule() -> String {
        "scaled_linear".into()
    }
    pub fn clip_sample_range() -> f32 {
        1.0
    }
    pub fn prediction_type() -> super::Prediction {
        super::Prediction::Epsilon
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str(r#"{"steps_offset": 1}"#).expect("defaults parse")
    }
}

pub struct Scheduler {
    pub sampler: Sampler,
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    /// Noise level of each step plus a final 0 (used by Euler and DPM++).
    sigmas: Vec<f32>,
    /// DPM++: the data predictions of the last two steps.
    previous: Vec<Vec<f32>>,
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

/// `np.interp` at `x` on the grid 0, 1, 2, ...
fn interp(values: &[f32], x: f64) -> f64 {
    let i = (x.floor() as usize).min(values.len() - 1);
    let j = (i + 1).min(values.len() - 1);
    let f = x - i as f64;
    values[i] as f64 * (1.0 - f) + values[j] as f64 * f
}

impl Scheduler {
    pub fn new(sampler: Sampler, config: SchedulerConfig, steps: usize) -> Result<Self> {
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Invalid(format!("steps must be between 1 and {n}, got {steps}")));
        }
        let betas: Vec<f64> = match config.beta_schedule.as_str() {
            "scaled_linear" => linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| (b as f32 as f64).powi(2))
                .collect(),
            "linear" => linspace(config.beta_start, config.beta_end, n),
            other => {
                return Err(Error::Invalid(format!(
                    "scheduler config: beta_schedule `{other}` is not supported (scaled_linear, linear)"
                )))
            }
        };
        let mut acc = 1.0f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= 1.0 - b as f32;
                acc
            })
            .collect();
        let spacing = config.timestep_spacing.unwrap_or(sampler.default_spacing());
        // DPM++ spaces `steps + 1` points and drops the last, as the reference does.
        let points = if sampler == Sampler::DpmPp2m { steps + 1 } else { steps };
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => linspace(0.0, (n - 1) as f64, points).into_iter().rev().collect(),
            Spacing::Leading => {
                let ratio = n / points;
                (0..points).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                (0..steps).map(|i| (n as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
            }
        };
        if sampler == Sampler::DpmPp2m && spacing != Spacing::Trailing {
            timesteps.truncate(steps);
        }
        // DDIM and DPM++ use integer timesteps; Euler keeps the fractional ones.
        if matches!(sampler, Sampler::Ddim | Sampler::DpmPp2m) || spacing != Spacing::Linspace {
            timesteps.iter_mut().for_each(|t| *t = t.round_ties_even());
        }
        let train_sigmas: Vec<f32> = alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(&train_sigmas, t) as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            sampler,
            config,
            alphas_cumprod,
            timesteps: timesteps.into_iter().map(|t| t as f32).collect(),
            sigmas,
            previous: Vec::new(),
        })
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// What the initial Gaussian noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        match self.sampler {
            Sampler::Ddim | Sampler::DpmPp2m => 1.0,
            Sampler::Euler | Sampler::EulerAncestral => {
                let max = self.sigmas[..self.sigmas.len() - 1].iter().fold(0.0f32, |m, &s| m.max(s));
                match self.config.timestep_spacing.unwrap_or(self.sampler.default_spacing()) {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                }
            }
        }
    }

    /// The factor the denoiser's input is scaled by at step `i`.
    pub fn input_scale(&self, i: usize) -> f32 {
        match self.sampler {
            Sampler::Euler | Sampler::EulerAncestral => 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt(),
            Sampler::Ddim | Sampler::DpmPp2m => 1.0,
        }
    }

    pub fn needs_noise(&self) -> bool {
        self.sampler == Sampler::EulerAncestral
    }

    /// The sample after step `i` from the denoiser's output `model` for sample `x`.
    /// `noise` (standard normal, like `x`) is required by the ancestral sampler.
    pub fn step(&mut self, i: usize, model: &[f32], x: &[f32], noise: Option<&[f32]>) -> Result<Vec<f32>> {
        if i >= self.timesteps.len() || model.len() != x.len() {
            return Err(Error::Invalid(format!(
                "scheduler step {i} of {} with {} outputs for {} latents",
                self.timesteps.len(),
                model.len(),
                x.len()
            )));
        }
        let v_pred = self.config.prediction_type == Prediction::VPrediction;
        Ok(match self.sampler {
            Sampler::Ddim => {
                let t = self.timesteps[i] as usize;
                let n = self.config.num_train_timesteps;
                let prev = t as isize - (n / self.timesteps.len()) as isize;
                let a_t = self.alphas_cumprod[t];
                let a_prev = if prev >= 0 {
                    self.alphas_cumprod[prev as usize]
                } else if self.config.set_alpha_to_one {
                    1.0
                } else {
                    self.alphas_cumprod[0]
                };
                let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
                let range = self.config.clip_sample_range;
                x.iter()
                    .zip(model)
                    .map(|(&x, &m)| {
                        let (mut x0, eps) = if v_pred {
                            (sa * x - sb * m, sa * m + sb * x)
                        } else {
                            ((x - sb * m) / sa, m)
                        };
                        if self.config.clip_sample {
                            x0 = x0.clamp(-range, range);
                        }
                        a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps
                    })
                    .collect()
            }
            Sampler::Euler | Sampler::EulerAncestral => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = |x: f32, m: f32| {
                    if v_pred {
                        m * (-sigma / (sigma * sigma + 1.0).sqrt()) + x / (sigma * sigma + 1.0)
                    } else {
                        x - sigma * m
                    }
                };
                if self.sampler == Sampler::Euler {
                    let dt = next - sigma;
                    x.iter().zip(model).map(|(&x, &m)| x + (x - x0(x, m)) / sigma * dt).collect()
                } else {
                    let Some(noise) = noise.filter(|n| n.len() == x.len()) else {
                        return Err(Error::Invalid("the euler_a sampler needs one noise value per latent".into()));
                    };
                    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                    let down = (next * next - up * up).sqrt();
                    let dt = down - sigma;
                    x.iter()
                        .zip(model)
                        .zip(noise)
                        .map(|((&x, &m), &z)| x + (x - x0(x, m)) / sigma * dt + z * up)
                        .collect()
                }
            }
            Sampler::DpmPp2m => {
                let alpha_sigma = |s: f32| {
                    let a = 1.0 / (s * s + 1.0).sqrt();
                    (a, s * a)
                };
                let lambda = |s: f32| {
                    let (a, s) = alpha_sigma(s);
                    a.ln() - s.ln()
                };
                let (a_s, s_s) = alpha_sigma(self.sigmas[i]);
                let data: Vec<f32> = x
                    .iter()
                    .zip(model)
                    .map(|(&x, &m)| if v_pred { a_s * x - s_s * m } else { (x - s_s * m) / a_s })
                    .collect();
                let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
                let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
                let phi = (-h).exp() - 1.0;
                let last = i + 1 == self.timesteps.len();
                let out = match self.previous.last() {
                    // Second order (midpoint) except on the first and the final step.
                    Some(prev) if !last => {
                        let h0 = lambda(self.sigmas[i]) - lambda(self.sigmas[i - 1]);
                        let r0 = h0 / h;
                        x.iter()
                            .zip(&data)
                            .zip(prev)
                            .map(|((&x, &d0), &d1)| s_t / s_s * x - a_t * phi * d0 - 0.5 * a_t * phi * (d0 - d1) / r0)
                            .collect()
                    }
                    _ => x.iter().zip(&data).map(|(&x, &d0)| s_t / s_s * x - a_t * phi * d0).collect(),
                };
                self.previous = vec![data];
                out
            }
        })
    }
}

//! Samplers for Wan's flow-matching models, following diffusers step for step: flow-matching
//! Euler (`FlowMatchEulerDiscreteScheduler`) and UniPC with flow sigmas
//! (`UniPCMultistepScheduler`, order 2, bh2, predict-x0, with its corrector), both with the
//! timestep shift `sigma' = shift * sigma / (1 + (shift - 1) * sigma)`. Host `f32` latents.

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowSampler {
    Euler,
    UniPc,
}

impl FlowSampler {
    pub const NAMES: [&'static str; 2] = ["flow_euler", "unipc"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "flow_euler" | "euler" => Ok(FlowSampler::Euler),
            "unipc" => Ok(FlowSampler::UniPc),
            other => Err(Error::Invalid(format!(
                "unknown sampler `{other}` for a flow-matching model (choose one of {})",
                FlowSampler::NAMES.join(", ")
            ))),
        }
    }
}

/// Mirrors the fields of Wan's `scheduler_config.json` these samplers read.
#[derive(Clone, Debug, Deserialize)]
pub struct FlowSchedulerConfig {
    #[serde(default = "d::num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// `flow_shift` in UniPC's config, `shift` in the Euler scheduler's.
    #[serde(default = "d::flow_shift", alias = "shift")]
    pub flow_shift: f64,
}

mod d {
    pub fn num_train_timesteps() -> usize {
        1000
    }
    pub fn flow_shift() -> f64 {
        3.0
    }
}

impl Default for FlowSchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

pub struct FlowScheduler {
    pub sampler: FlowSampler,
    timesteps: Vec<f32>,
    /// Noise level of each step plus a final 0.
    sigmas: Vec<f32>,
    /// UniPC: data predictions of the last two steps (oldest first), the sample the last
    /// predictor started from, and the order it used.
    outputs: Vec<Vec<f32>>,
    last_sample: Option<Vec<f32>>,
    last_order: usize,
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect()
}

impl FlowScheduler {
    pub fn new(sampler: FlowSampler, config: &FlowSchedulerConfig, steps: usize) -> Result<Self> {
        let n = config.num_train_timesteps as f64;
        if steps == 0 || config.flow_shift <= 0.0 {
            return Err(Error::Invalid(format!(
                "flow sampler needs at least one step and a positive shift (got {steps} steps, shift {})",
                config.flow_shift
            )));
        }
        let shift = |s: f64| config.flow_shift * s / (1.0 + (config.flow_shift - 1.0) * s);
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = match sampler {
            FlowSampler::Euler => {
                // The reference shifts the training range's end points, then the schedule again.
                let (max, min) = (shift(1.0), shift(1.0 / n));
                let sigmas: Vec<f64> = linspace(max * n, min * n, steps).into_iter().map(|t| shift(t / n)).collect();
                let t = sigmas.iter().map(|s| (*s as f32 * n as f32) as f64).collect();
                (sigmas, t)
            }
            FlowSampler::UniPc => {
                let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / n, steps + 1)[..steps].iter().map(|&s| shift(s)).collect();
                // As the reference: keeps log(1 - sigma) finite on the first steps.
                if (sigmas[0] - 1.0).abs() < 1e-6 {
                    sigmas[0] -= 1e-6;
                }
                let t = sigmas.iter().map(|s| (s * n).trunc()).collect();
                (sigmas, t)
            }
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            sampler,
            timesteps: timesteps.into_iter().map(|t| t as f32).collect(),
            sigmas,
            outputs: Vec::new(),
            last_sample: None,
            last_order: 0,
        })
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sample after step `i` from the predicted velocity `v` for sample `x`.
    pub fn step(&mut self, i: usize, v: &[f32], x: &[f32]) -> Result<Vec<f32>> {
        if i >= self.timesteps.len() || v.len() != x.len() {
            return Err(Error::Invalid(format!(
                "flow scheduler step {i} of {} with {} outputs for {} latents",
                self.timesteps.len(),
                v.len(),
                x.len()
            )));
        }
        let (s_i, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        Ok(match self.sampler {
            FlowSampler::Euler => x.iter().zip(v).map(|(&x, &v)| x + (s_next - s_i) * v).collect(),
            FlowSampler::UniPc => self.unipc_step(i, v, x),
        })
    }

    fn lambda(&self, j: usize) -> f64 {
        let s = self.sigmas[j] as f64;
        (1.0 - s).ln() - s.ln()
    }

    fn unipc_step(&mut self, i: usize, v: &[f32], x: &[f32]) -> Vec<f32> {
        let s_i = self.sigmas[i];
        let data: Vec<f32> = x.iter().zip(v).map(|(&x, &v)| x - s_i * v).collect();
        // Corrector: refines this sample with the new data prediction.
        let mut sample = x.to_vec();
        if let Some(last) = self.last_sample.take() {
            let h = self.lambda(i) - self.lambda(i - 1);
            let hh = -h;
            let b_h = hh.exp_m1();
            let (a_t, ratio) = (1.0 - s_i as f64, s_i as f64 / self.sigmas[i - 1] as f64);
            let m0 = &self.outputs[self.outputs.len() - 1];
            let (rho_prev, rho_t, rk) = if self.last_order == 2 {
                let rk = (self.lambda(i - 2) - self.lambda(i - 1)) / h;
                let mut phi_k = b_h / hh - 1.0;
                let b1 = phi_k / b_h;
                phi_k = phi_k / hh - 0.5;
                let b2 = phi_k * 2.0 / b_h;
                let rho0 = (b1 - b2) / (1.0 - rk);
                (rho0, b1 - rho0, rk)
            } else {
                (0.0, 0.5, 1.0)
            };
            let m1 = (self.last_order == 2).then(|| &self.outputs[self.outputs.len() - 2]);
            sample = (0..x.len())
                .map(|j| {
                    let base = ratio * last[j] as f64 - a_t * b_h * m0[j] as f64;
                    let corr = m1.map_or(0.0, |m1| rho_prev * (m1[j] as f64 - m0[j] as f64) / rk);
                    (base - a_t * b_h * (corr + rho_t * (data[j] as f64 - m0[j] as f64))) as f32
                })
                .collect();
        }
        self.outputs.push(data);
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
        let order = 2.min(self.timesteps.len() - i).min(self.outputs.len());
        // Predictor.
        let (s_t, s_s0) = (self.sigmas[i + 1] as f64, s_i as f64);
        let hh = -(self.lambda(i + 1) - self.lambda(i));
        let b_h = hh.exp_m1();
        let a_t = 1.0 - s_t;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let d1 = (order == 2).then(|| {
            let rk = (self.lambda(i - 1) - self.lambda(i)) / -hh;
            (&self.outputs[0], rk)
        });
        let next = (0..x.len())
            .map(|j| {
                let base = s_t / s_s0 * sample[j] as f64 - a_t * b_h * m0[j] as f64;
                let pred = d1.map_or(0.0, |(m1, rk)| 0.5 * (m1[j] as f64 - m0[j] as f64) / rk);
                (base - a_t * b_h * pred) as f32
            })
            .collect();
        self.last_sample = Some(sample);
        self.last_order = order;
        next
    }
}

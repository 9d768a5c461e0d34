//! `bench --nf4-rows 1,2,4,...`: the two NF4 product paths (the decode GEMV, and dequantize +
//! matmul) at each row count, on the config's largest projection (`fc1`, `[intermediate,
//! hidden]`): microseconds per product and the weight bytes read per second. Where the GEMV
//! stops winning is what `DEFAULT_NF4_GEMV_MAX_ROWS` should be. Backends without a GEMV (the
//! CPU) time their one path twice.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use phitune_model::PhiConfig;
use phitune_model::ops::{self, Nf4Backend, Nf4Host};
use serde::Serialize;

use super::measure::median;
use crate::backend::Job;

#[derive(Debug, Serialize)]
pub struct RowTiming {
    pub m: usize,
    pub gemv_us: f64,
    pub dequantize_matmul_us: f64,
    /// NF4 bytes (codes and f32 absmax) per second through the GEMV, GB/s.
    pub gemv_weight_gb_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Nf4RowsReport {
    pub shape: [usize; 2],
    pub default_gemv_max_rows: usize,
    pub rows: Vec<RowTiming>,
}

pub struct Nf4Rows<'a> {
    pub config: PhiConfig,
    pub rows: &'a [usize],
    pub repeats: usize,
}

impl Job for Nf4Rows<'_> {
    type Output = Nf4RowsReport;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Nf4RowsReport> {
        let (n, k) = (self.config.intermediate_size, self.config.hidden_size);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let host: Vec<f32> = (0..n * k)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.05
            })
            .collect();
        let q = Nf4Host::quantize(&host, [n, k], true);
        let words = q.device_words();
        let absmax = q.absmax_f32();
        let bytes = (words.len() * 4 + absmax.len() * 4) as f64;
        let packed: Tensor<B, 1, Int> =
            Tensor::from_data(TensorData::new(words.clone(), [words.len()]), &device);
        let absmax: Tensor<B, 1> =
            Tensor::from_data(TensorData::new(absmax.clone(), [absmax.len()]), &device);
        let time = |m: usize, limit: usize| -> f64 {
            ops::set_nf4_gemv_max_rows(limit);
            let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let call = || ops::nf4_linear(x.clone(), packed.clone(), absmax.clone(), [n, k]);
            for _ in 0..3 {
                let _ = call();
            }
            let _ = B::sync(&device);
            let mut times = Vec::with_capacity(self.repeats);
            for _ in 0..self.repeats {
                let t = Instant::now();
                for _ in 0..10 {
                    let _ = call();
                }
                let _ = B::sync(&device);
                times.push(t.elapsed().as_secs_f64() / 10.0);
            }
            median(&times) * 1e6
        };
        let rows = self
            .rows
            .iter()
            .map(|&m| {
                let gemv_us = time(m, usize::MAX);
                let dequantize_matmul_us = time(m, 0);
                RowTiming {
                    m,
                    gemv_us,
                    dequantize_matmul_us,
                    gemv_weight_gb_s: bytes / (gemv_us * 1e-6) / 1e9,
                }
            })
            .collect();
        ops::set_nf4_gemv_max_rows(ops::DEFAULT_NF4_GEMV_MAX_ROWS);
        Ok(Nf4RowsReport {
            shape: [n, k],
            default_gemv_max_rows: ops::DEFAULT_NF4_GEMV_MAX_ROWS,
            rows,
        })
    }
}

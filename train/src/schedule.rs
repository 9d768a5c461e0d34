//! The learning-rate schedule in optimizer steps: linear warmup from 0, then cosine decay to 0,
//! exactly transformers' `get_cosine_schedule_with_warmup` (the seed recipe's). The Learner's
//! scheduler is stepped once per optimizer step by our step loop, not once per micro-batch.

use burn::lr_scheduler::LrScheduler;
use burn::tensor::backend::Backend;

#[derive(Debug, Clone)]
pub struct WarmupCosine {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    /// Optimizer steps already taken: the next `step()` returns the rate for this step.
    pub next: usize,
}

impl WarmupCosine {
    pub fn new(peak: f64, warmup: usize, total: usize) -> Self {
        Self {
            peak,
            warmup,
            total,
            next: 0,
        }
    }

    /// The rate used by optimizer step `step` (0-based), as transformers' `LambdaLR` gives it.
    pub fn lr_at(&self, step: usize) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            let progress =
                (step - self.warmup) as f64 / self.total.saturating_sub(self.warmup).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        };
        self.peak * factor
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.next);
        self.next += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.next
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.next = record;
        self
    }
}

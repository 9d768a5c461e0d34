//! What the run shows while it trains: burn-train's live dashboard (the TUI) speaking the run's
//! words, or nothing (without a terminal the step loop prints one plain line per step).
//!
//! The step loop reports to burn-train in its terms: an "epoch" is an evaluation interval and
//! an "item" a micro-batch. [`Dashboard`] translates them before the TUI draws: its status
//! panel shows the optimizer step out of the run's total (and the micro-batch within the step
//! under gradient accumulation), and its progress bar and ETA run over the whole run's
//! micro-batches, from where this process started (a resumed run included). Each metric reads
//! "last X · avg Y" (the last micro-batch, and the mean since the last evaluation or over the
//! held-out set so far) where burn-train writes "epoch Y - batch X".

use burn::data::dataloader::Progress;
use burn::train::metric::{MetricDefinition, MetricEntry};
use burn::train::renderer::tui::TuiMetricsRendererWrapper;
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{Interrupter, LearnerSummary};

/// The run's shape, as the step loop counts it.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    pub max_steps: usize,
    pub grad_accum: usize,
    /// The first step this process runs (after a resume, the checkpoint's step).
    pub start_step: usize,
}

/// What the step loop reported, in the run's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    /// The optimizer step being computed (1-based).
    step: usize,
    /// Micro-batches of that step done (1..=grad_accum).
    micro_batch: usize,
}

impl RunShape {
    /// The step loop sends, per micro-batch: `iteration` = the step in progress (1-based) and
    /// `progress.items_processed` = micro-batches done in the current evaluation interval.
    fn position(&self, item: &TrainingProgress) -> Position {
        let step = item.iteration.unwrap_or(self.start_step + 1).max(1);
        let done = item.progress.as_ref().map_or(0, |p| p.items_processed);
        let micro_batch = match done {
            0 => 0,
            n => (n - 1) % self.grad_accum.max(1) + 1,
        };
        Position { step, micro_batch }
    }

    /// burn-train's progress rewritten as one "epoch" holding every micro-batch this process
    /// runs, so the TUI's bar and ETA cover the run (not the interval).
    fn overall(&self, pos: Position) -> TrainingProgress {
        let total = (self.max_steps - self.start_step) * self.grad_accum;
        let done =
            (pos.step - 1).saturating_sub(self.start_step) * self.grad_accum + pos.micro_batch;
        TrainingProgress {
            progress: Some(Progress::new(done.min(total), total.max(1))),
            global_progress: Progress::new(1, 1),
            iteration: Some(done),
        }
    }

    fn indicators(&self, pos: Position) -> Vec<ProgressType> {
        let mut out = vec![ProgressType::Detailed {
            tag: "Step".into(),
            progress: Progress::new(pos.step, self.max_steps),
        }];
        if self.grad_accum > 1 {
            out.push(ProgressType::Detailed {
                tag: "Micro-batch".into(),
                progress: Progress::new(pos.micro_batch, self.grad_accum),
            });
        }
        out
    }
}

/// burn-train's TUI with the status and progress in optimizer steps.
pub struct Dashboard {
    tui: TuiMetricsRendererWrapper,
    shape: RunShape,
    /// The last step trained, shown while the held-out set is evaluated after it.
    last: Position,
}

impl Dashboard {
    pub fn new(interrupter: Interrupter, shape: RunShape) -> Self {
        // The TUI draws the whole terminal from here: background status lines keep quiet.
        phitune_model::io::set_terminal_taken(true);
        Self {
            tui: TuiMetricsRendererWrapper::new(interrupter, None),
            shape,
            last: Position {
                step: shape.start_step + 1,
                micro_batch: 0,
            },
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        phitune_model::io::set_terminal_taken(false);
    }
}

impl MetricsRendererTraining for Dashboard {
    fn update_train(&mut self, state: MetricState) {
        self.tui.update_train(in_run_words(state))
    }

    fn update_valid(&mut self, state: MetricState) {
        self.tui.update_valid(in_run_words(state))
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let pos = self.shape.position(&item);
        self.last = pos;
        self.tui
            .render_train(self.shape.overall(pos), self.shape.indicators(pos))
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let mut indicators = vec![ProgressType::Detailed {
            tag: "Step".into(),
            progress: Progress::new(self.last.step, self.shape.max_steps),
        }];
        if let Some(p) = &item.progress {
            indicators.push(ProgressType::Detailed {
                tag: "Held-out".into(),
                progress: p.clone(),
            });
        }
        self.tui.render_valid(item, indicators)
    }

    fn on_train_end(
        &mut self,
        summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.tui.on_train_end(summary)
    }
}

impl MetricsRendererEvaluation for Dashboard {
    fn update_test(&mut self, name: EvaluationName, state: MetricState) {
        self.tui.update_test(name, state)
    }

    fn render_test(&mut self, item: EvaluationProgress, indicators: Vec<ProgressType>) {
        self.tui.render_test(item, indicators)
    }
}

impl MetricsRenderer for Dashboard {
    fn manual_close(&mut self) {
        self.tui.manual_close()
    }

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.tui.register_metric(definition)
    }
}

/// burn-train's "epoch A - batch B" (A the running mean, B the last value) as "last B · avg A".
fn in_run_words(state: MetricState) -> MetricState {
    let reword = |mut entry: MetricEntry| {
        let text = &entry.serialized_entry.formatted;
        if let Some((avg, last)) = text
            .strip_prefix("epoch ")
            .and_then(|rest| rest.split_once(" - batch "))
        {
            entry.serialized_entry.formatted = format!("last {last} · avg {avg}");
        }
        entry
    };
    match state {
        MetricState::Generic(e) => MetricState::Generic(reword(e)),
        MetricState::Numeric(e, n) => MetricState::Numeric(reword(e), n),
    }
}

/// The renderer used without a terminal: the step loop prints its own lines.
pub struct Quiet;

impl MetricsRendererTraining for Quiet {
    fn update_train(&mut self, _: MetricState) {}
    fn update_valid(&mut self, _: MetricState) {}
    fn render_train(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
    fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
}

impl MetricsRendererEvaluation for Quiet {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for Quiet {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _: MetricDefinition) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(step: usize, done_in_interval: usize, interval_total: usize) -> TrainingProgress {
        TrainingProgress {
            progress: Some(Progress::new(done_in_interval, interval_total)),
            global_progress: Progress::new(2, 3),
            iteration: Some(step),
        }
    }

    fn detailed(p: &ProgressType) -> (String, usize, usize) {
        match p {
            ProgressType::Detailed { tag, progress } => {
                (tag.clone(), progress.items_processed, progress.items_total)
            }
            ProgressType::Value { tag, value } => (tag.clone(), *value, 0),
        }
    }

    #[test]
    fn the_status_speaks_in_optimizer_steps() {
        // 60 steps of 4 micro-batches, evaluated every 20 steps: step 27's third micro-batch
        // is the 7th step of the second interval, item 6 * 4 + 3 = 27 of 80.
        let shape = RunShape {
            max_steps: 60,
            grad_accum: 4,
            start_step: 0,
        };
        let pos = shape.position(&item(27, 27, 80));
        assert_eq!(
            pos,
            Position {
                step: 27,
                micro_batch: 3
            }
        );
        let shown: Vec<_> = shape.indicators(pos).iter().map(detailed).collect();
        assert_eq!(
            shown,
            [("Step".into(), 27, 60), ("Micro-batch".into(), 3, 4)]
        );
        let overall = shape.overall(pos);
        let p = overall.progress.unwrap();
        assert_eq!((p.items_processed, p.items_total), (26 * 4 + 3, 240));
        assert_eq!(overall.global_progress.items_total, 1);
    }

    #[test]
    fn metric_text_reads_last_and_average() {
        let entry = |text: &str| {
            MetricEntry::new(
                burn::train::metric::MetricId::new(std::sync::Arc::new("loss".into())),
                burn::train::metric::SerializedEntry::new(text.into(), "5.0".into()),
            )
        };
        let text = |s: MetricState| match s {
            MetricState::Generic(e) | MetricState::Numeric(e, _) => e.serialized_entry.formatted,
        };
        let s = in_run_words(MetricState::Generic(entry("epoch 5.3241 - batch 5.0461")));
        assert_eq!(text(s), "last 5.0461 · avg 5.3241");
        let s = in_run_words(MetricState::Generic(entry("epoch 13.33 % - batch 14.20 %")));
        assert_eq!(text(s), "last 14.20 % · avg 13.33 %");
        let s = in_run_words(MetricState::Generic(entry("something else")));
        assert_eq!(text(s), "something else");
    }

    #[test]
    fn a_resumed_run_counts_from_its_first_step() {
        let shape = RunShape {
            max_steps: 10,
            grad_accum: 1,
            start_step: 6,
        };
        let pos = shape.position(&item(8, 2, 4));
        assert_eq!(
            pos,
            Position {
                step: 8,
                micro_batch: 1
            }
        );
        let shown: Vec<_> = shape.indicators(pos).iter().map(detailed).collect();
        assert_eq!(
            shown,
            [("Step".into(), 8, 10)],
            "no micro-batch line without accumulation"
        );
        let p = shape.overall(pos).progress.unwrap();
        assert_eq!((p.items_processed, p.items_total), (2, 4));
    }
}

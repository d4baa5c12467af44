//! Plain progress lines for non-interactive runs (logs, CI), instead of Burn's terminal
//! dashboard: one line when an epoch starts; the epoch's metrics are printed by the metrics
//! logger when it ends.

use std::time::Instant;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};

/// Prints `epoch N/M` lines to stderr.
pub struct PlainRenderer {
    epochs: usize,
    epoch: usize,
    started: Instant,
}

impl PlainRenderer {
    /// A renderer with nothing printed yet.
    pub fn new() -> Self {
        Self {
            epochs: 0,
            epoch: 0,
            started: Instant::now(),
        }
    }
}

impl Default for PlainRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl TrainingProgressLogger for PlainRenderer {
    fn start(
        &mut self,
        total_epochs: usize,
        starting_epoch: usize,
        _total_items: Option<usize>,
        _label: Option<&str>,
    ) {
        self.epochs = total_epochs;
        self.epoch = starting_epoch;
        self.started = Instant::now();
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        if split == "train" {
            eprintln!(
                "epoch {}/{}: training on {total_items} images ({:.0} s elapsed)",
                self.epoch,
                self.epochs,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn update_split(&mut self, _items_processed: usize) {}
    fn end_split(&mut self) {}

    fn end(&mut self) {
        eprintln!(
            "training ended after {:.0} s",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for PlainRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}

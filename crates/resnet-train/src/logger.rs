//! A Burn `MetricLogger` that turns each finished epoch into a row of `metrics.csv` and
//! redraws `curves.png`, so a run's figures are on disk after every epoch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};

use crate::plots::{EpochMetrics, draw_curves, write_metrics_csv};

/// Shared, growing list of epoch rows (also read by the trainer when it finishes).
pub type Rows = Arc<Mutex<Vec<EpochMetrics>>>;

/// Collects the running (epoch-average) value of each numeric metric and writes a row when
/// Burn closes an epoch of a split.
pub struct CsvMetricLogger {
    dir: PathBuf,
    rows: Rows,
    names: HashMap<MetricId, String>,
    /// Latest running value per (split, metric name).
    current: HashMap<(String, String), f64>,
    epoch_start: HashMap<String, Instant>,
    /// The learning rate of the last training epoch (validation rows repeat it).
    last_lr: f64,
}

impl CsvMetricLogger {
    /// A logger writing `dir/metrics.csv` and `dir/curves.png`, continuing `rows` (the rows of
    /// earlier epochs when resuming).
    pub fn new(dir: PathBuf, rows: Rows) -> Self {
        Self {
            dir,
            rows,
            names: HashMap::new(),
            current: HashMap::new(),
            epoch_start: HashMap::new(),
            last_lr: f64::NAN,
        }
    }
}

fn split_name(split: &Split) -> String {
    match split {
        Split::Train => "train".into(),
        Split::Valid => "val".into(),
        other => other.to_string(),
    }
}

impl MetricLogger for CsvMetricLogger {
    fn log(&mut self, update: MetricsUpdate, _epoch: usize, split: &Split) {
        let split = split_name(split);
        self.epoch_start
            .entry(split.clone())
            .or_insert_with(Instant::now);
        for numeric in update.entries_numeric {
            let Some(name) = self.names.get(&numeric.entry.metric_id) else {
                continue;
            };
            if let Some(entry) = numeric.running_entry.or(numeric.numeric_entry) {
                self.current
                    .insert((split.clone(), name.clone()), entry.current());
            }
        }
    }

    fn read_numeric(
        &mut self,
        _name: &str,
        _epoch: usize,
        _split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err("the CSV logger does not read back".into())
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.names
            .insert(definition.metric_id, definition.name.to_string());
    }

    fn log_epoch_summary(&mut self, summary: EpochSummary) {
        let split = split_name(&summary.split);
        let value = |needle: &str| {
            self.current
                .iter()
                .find(|((s, name), _)| *s == split && name.to_lowercase() == needle)
                .map(|(_, v)| *v)
        };
        let percent = |v: Option<f64>| v.map(|v| v / 100.0);
        let row = EpochMetrics {
            epoch: summary.epoch_number,
            split: split.clone(),
            loss: value("loss").unwrap_or(f64::NAN),
            acc1: percent(value("accuracy")).unwrap_or(f64::NAN),
            acc5: percent(value("top-k accuracy @ topk(5)")),
            lr: value("learning rate").unwrap_or(self.last_lr),
            seconds: self
                .epoch_start
                .remove(&split)
                .map_or(0.0, |start| start.elapsed().as_secs_f64()),
        };
        self.last_lr = row.lr;
        self.current.retain(|(s, _), _| *s != split);
        eprintln!(
            "epoch {} {split}: loss {:.4}, top-1 {:.2}%{}, {:.1} s",
            row.epoch,
            row.loss,
            row.acc1 * 100.0,
            row.acc5
                .map_or(String::new(), |a| format!(", top-5 {:.2}%", a * 100.0)),
            row.seconds
        );
        let Ok(mut rows) = self.rows.lock() else {
            return;
        };
        rows.retain(|r| !(r.epoch == row.epoch && r.split == row.split));
        rows.push(row);
        rows.sort_by(|a, b| (a.epoch, &a.split).cmp(&(b.epoch, &b.split)));
        if let Err(err) = write_metrics_csv(&self.dir.join("metrics.csv"), &rows) {
            eprintln!("warning: cannot write metrics.csv: {err}");
        }
        if let Err(err) = draw_curves(&self.dir.join("curves.png"), &rows) {
            eprintln!("warning: cannot draw curves.png: {err:#}");
        }
    }
}

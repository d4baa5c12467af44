//! Data-parallel training over several processes on 127.0.0.1: `resnet-train serve-devices`
//! workers and a trainer dialing them, on the flex CPU backend. Every process is killed and
//! reaped when a test ends, whatever happens, and every wait is bounded.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use common::{args, head_weights, max_abs_diff, shapes_dataset};
use resnet_model::ResNet;
use resnet_train::train::run;

const TOKEN: &str = "loopback-test-token";

fn train_binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resnet-train"));
    // Several processes share the 2 cores of a CI machine; no scheduler variables leak in.
    command
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("RESNET_REMOTE")
        .env_remove("RESNET_REMOTE_TEMPLATE")
        .env_remove("RESNET_REMOTE_TOKEN");
    command
}

/// The processes a test started: killed and reaped when dropped.
#[derive(Default)]
struct Processes(Vec<Child>);

impl Processes {
    fn wait(&mut self, index: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0[index].try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `resnet-train serve-devices` on a free loopback port; returns its index in
/// `processes` and its address, read from the line it prints once it listens.
/// The worker's stderr goes to `worker-<pid>.log` next to the token file.
fn start_worker(processes: &mut Processes, token_file: &Path) -> (usize, String) {
    let log = tempfile::NamedTempFile::with_prefix_in("worker-", token_file.parent().unwrap())
        .unwrap()
        .keep()
        .unwrap()
        .0;
    let mut child = train_binary()
        .args(["serve-devices", "--listen", "127.0.0.1:0", "--once"])
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    processes.0.push(child);
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("listening on ") {
                let url = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = send.send(url);
            }
        }
    });
    let url = receive
        .recv_timeout(Duration::from_secs(60))
        .expect("the worker did not start listening within 60 s");
    (processes.0.len() - 1, url)
}

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path
}

/// Every parameter of the network in `record`, flattened in a fixed order, and the first
/// batch norm's running mean.
fn parameters(record: &Path) -> (Vec<f32>, Vec<f32>) {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0
                .extend(param.val().into_data().try_to_vec::<f32>().unwrap());
        }
    }
    let (net, _): (ResNet, _) = resnet_import::load_record(record, &Device::flex()).unwrap();
    let mut collect = Collect(Vec::new());
    net.visit(&mut collect);
    let running = net.bn1.running_mean.value().into_data();
    (collect.0, running.try_to_vec::<f32>().unwrap())
}

/// Starts the trainer binary with `--remote urls`, its stderr piped; returns its index in
/// `processes`.
fn spawn_trainer(
    processes: &mut Processes,
    data: &Path,
    out: &Path,
    urls: &[String],
    token_file: &Path,
    extra: &[&str],
) -> usize {
    let child = train_binary()
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--remote")
        .arg(urls.join(","))
        .arg("--token-file")
        .arg(token_file)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    processes.0.push(child);
    processes.0.len() - 1
}

/// Runs the trainer binary to completion (at most `timeout`), with `--remote urls`.
fn trainer(
    processes: &mut Processes,
    data: &Path,
    out: &Path,
    urls: &[String],
    token_file: &Path,
    extra: &[&str],
    timeout: Duration,
) -> (ExitStatus, String) {
    let index = spawn_trainer(processes, data, out, urls, token_file, extra);
    let stderr = processes.0[index].stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = processes
        .wait(index, timeout)
        .unwrap_or_else(|| panic!("the trainer did not finish within {timeout:?}"));
    let mut stderr = reader.join().unwrap();
    if !status.success() {
        for entry in std::fs::read_dir(token_file.parent().unwrap()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("worker-")
            {
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                stderr.push_str(&format!("--- {}:\n{log}", path.display()));
            }
        }
    }
    (status, stderr)
}

/// (a) and (b): a trainer with one remote worker trains as one process with two replicas of
/// the same device (same shards, same seeds, batch-norm statistics and all), and the worker
/// leaves on its own once the trainer is done, having written nothing.
///
/// Not bit for bit: the local replica's convolutions run resnet-rs's flex kernels, while a
/// device served over burn-remote runs Burn's own (custom operations do not cross the remote
/// protocol); the two round differently, about 2e-5 after two epochs. A wrong gradient
/// reduction or shard would be off by 1e-2 or more.
#[test]
fn a_remote_worker_trains_like_a_local_replica() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 10, 4);
    let token = token_file(dir.path());
    let common = [
        "--width",
        "4",
        "--cifar-stem",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--seed",
        "5",
    ];

    let local = run(
        &args(&data, &dir.path().join("local"), &common),
        &[Device::flex(), Device::flex()],
    )
    .unwrap();

    let mut processes = Processes::default();
    let (worker, url) = start_worker(&mut processes, &token);
    let out = dir.path().join("remote");
    let (status, stderr) = trainer(
        &mut processes,
        &data,
        &out,
        std::slice::from_ref(&url),
        &token,
        &common,
        Duration::from_secs(600),
    );
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{url} device 0")), "{stderr}");
    let (local_params, local_running) = parameters(&local.final_record);
    let (remote_params, remote_running) = parameters(&out.join("final.bpk"));
    let diff = max_abs_diff(&local_params, &remote_params);
    let running = max_abs_diff(&local_running, &remote_running);
    println!(
        "local replicas vs remote worker: max parameter difference {diff:e}, running mean {running:e}"
    );
    assert!(diff <= 1e-4, "the remote run differs by {diff}");
    let worker_status = processes
        .wait(worker, Duration::from_secs(30))
        .expect("the worker did not exit within 30 s of the trainer");
    assert!(worker_status.success());
}

/// (b) with three processes: the head trained by a trainer and two workers, each on a third
/// of one batch, equals the head trained by one process on the whole batch (frozen backbone,
/// so batch-norm statistics cannot differ between the shards).
#[test]
fn three_processes_update_like_one_on_the_combined_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 10, 4);
    let token = token_file(dir.path());
    let start = run(
        &args(
            &data,
            &dir.path().join("init"),
            &[
                "--width",
                "4",
                "--cifar-stem",
                "--epochs",
                "1",
                "--batch-size",
                "15",
            ],
        ),
        &[Device::flex()],
    )
    .unwrap()
    .final_record;
    // 30 training images, one step of 30 (10 per process).
    let step = [
        "--init",
        start.to_str().unwrap(),
        "--freeze-backbone",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch-size",
        "30",
        "--lr",
        "0.5",
        "--image-size",
        "32",
    ];
    let one = run(
        &args(&data, &dir.path().join("one"), &step),
        &[Device::flex()],
    )
    .unwrap();

    let mut processes = Processes::default();
    let (_, first) = start_worker(&mut processes, &token);
    let (_, second) = start_worker(&mut processes, &token);
    let out = dir.path().join("three");
    let (status, stderr) = trainer(
        &mut processes,
        &data,
        &out,
        &[first, second],
        &token,
        &step,
        Duration::from_secs(600),
    );
    assert!(status.success(), "{stderr}");

    let before = head_weights(&start);
    let one = head_weights(&one.final_record);
    let three = head_weights(&out.join("final.bpk"));
    let update = max_abs_diff(&one, &before);
    let diff = max_abs_diff(&one, &three);
    println!("head update {update:e}; one process vs three {diff:e}");
    assert!(update > 1e-3, "the head barely trained: {update}");
    assert!(
        diff <= 1e-4 * update,
        "one vs three processes differ by {diff} (update {update})"
    );
}

/// (c) Killing a worker in the middle of a run ends the trainer with a clear error within a
/// bounded time, and the other worker then leaves too.
#[test]
fn a_killed_worker_fails_the_run_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 40, 4);
    let token = token_file(dir.path());
    let mut processes = Processes::default();
    let (victim, first) = start_worker(&mut processes, &token);
    let (survivor, second) = start_worker(&mut processes, &token);
    let out = dir.path().join("run");
    let trainer = spawn_trainer(
        &mut processes,
        &data,
        &out,
        &[first, second],
        &token,
        &[
            "--width",
            "8",
            "--cifar-stem",
            "--epochs",
            "50",
            "--batch-size",
            "12",
            "--step-timeout",
            "30",
        ],
    );

    // Kill the first worker once an epoch has been checkpointed (training is under way).
    let deadline = Instant::now() + Duration::from_secs(300);
    while !out.join("checkpoint/model-1.bpk").exists() {
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        assert!(
            processes.0[trainer].try_wait().unwrap().is_none(),
            "the trainer ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    processes.0[victim].kill().unwrap();
    let killed = Instant::now();

    let status = processes
        .wait(trainer, Duration::from_secs(90))
        .expect("the trainer still runs 90 s after a worker was killed");
    println!("the trainer stopped {:?} after the kill", killed.elapsed());
    let mut stderr = String::new();
    std::io::Read::read_to_string(processes.0[trainer].stderr.as_mut().unwrap(), &mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(!out.join("final.bpk").exists());
    processes
        .wait(survivor, Duration::from_secs(30))
        .expect("the other worker still runs 30 s after the trainer failed");
}

fn output(command: &mut Command) -> Output {
    let mut processes = Processes::default();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    processes.0.push(child);
    processes
        .wait(0, Duration::from_secs(120))
        .expect("no answer within 120 s");
    let child = processes.0.pop().unwrap();
    child.wait_with_output().unwrap()
}

fn one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expected), "{stderr}");
}

/// Workers demand the token; a trainer with another one, or with no worker to reach, stops
/// with a one-line error.
#[test]
fn tokens_and_unreachable_workers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 2, 1);
    let token = token_file(dir.path());

    let no_token = output(train_binary().args(["serve-devices", "--listen", "127.0.0.1:0"]));
    one_line_error(&no_token, "needs a token");

    let mut processes = Processes::default();
    let (_, url) = start_worker(&mut processes, &token);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "another-token").unwrap();
    let refused = output(
        train_binary()
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("refused"))
            .args(["--remote", &url, "--token-file"])
            .arg(&wrong),
    );
    one_line_error(&refused, "refused the token");

    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = output(
        train_binary()
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("unreachable"))
            .args(["--connect-timeout", "2", "--remote"])
            .arg(format!("ws://127.0.0.1:{port}"))
            .arg("--token-file")
            .arg(&token),
    );
    one_line_error(&unreachable, "no worker answered");

    // RANK >= 1 makes the training command line a worker, which needs the token too.
    let rank = output(
        train_binary()
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .env("MASTER_PORT", "0")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("rank1")),
    );
    one_line_error(&rank, "needs a token");
    assert!(!dir.path().join("rank1").exists());
}

//! Data-parallel training over several processes or machines, on Burn's remote devices.
//!
//! Burn 0.22 has no collective operation across processes; its way to use another process's
//! devices is `burn-remote`. Each worker serves its devices over WebSocket ([`serve`]) and the
//! trainer dials them ([`connect`]), after which they join the trainer's multi-device strategy
//! like local devices: every step the model is sent to each device, each computes the
//! gradients of its share of the batch, and the trainer sums them and takes the one optimizer
//! step. Workers keep no state between steps, so only the trainer writes checkpoints and
//! metrics and `--resume` on the trainer resumes the whole group.
//!
//! Schedulers (torchrun, Kubernetes training operators, indexed Jobs) describe a group with
//! `RANK` and `WORLD_SIZE`: see [`Scheduler`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::backend::Backend;

/// Environment variable holding the shared token when no `--token-file` is given.
pub const TOKEN_ENV: &str = "RESNET_REMOTE_TOKEN";
/// Workers' port when neither `--listen` nor `MASTER_PORT` says otherwise (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// The shared token that workers require from the trainer.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TokenArgs {
    /// File holding the token shared by the trainer and its workers (workers refuse clients
    /// without it). Default: the `RESNET_REMOTE_TOKEN` environment variable.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Workers accept any client, without a token: only on a trusted network.
    #[arg(long)]
    pub no_token: bool,
}

impl TokenArgs {
    /// The token from `--token-file` or `RESNET_REMOTE_TOKEN` (surrounding whitespace removed),
    /// if any. An empty one is an error.
    pub fn token(&self) -> Result<Option<String>> {
        let (token, source) = match &self.token_file {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?,
                path.display().to_string(),
            ),
            None => match std::env::var(TOKEN_ENV) {
                Ok(token) => (token, TOKEN_ENV.to_string()),
                Err(_) => return Ok(None),
            },
        };
        let token = token.trim();
        if token.is_empty() {
            bail!("the token in {source} is empty");
        }
        Ok(Some(token.to_string()))
    }
}

/// Serve this machine's devices to a trainer (`resnet-train serve-devices`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "resnet-train serve-devices",
    bin_name = "resnet-train serve-devices",
    version,
    about = "Serve this machine's devices to a resnet-train trainer (a data-parallel worker)"
)]
pub struct ServeArgs {
    /// Address to listen on, `HOST:PORT` (port 0: any free port). Default: `0.0.0.0:$MASTER_PORT`,
    /// port 29500 when `MASTER_PORT` is unset.
    #[arg(long)]
    pub listen: Option<String>,
    /// Backend of the served devices (flex, ndarray or a CubeCL one; libtorch cannot be served).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Indices of the devices to serve, e.g. `0,1`. Default: the backend's default device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// The token shared with the trainer.
    #[command(flatten)]
    pub auth: TokenArgs,
    /// Exit once a trainer has connected and then closed all its sessions (it finished, failed
    /// or died), instead of serving until Ctrl+C or SIGTERM.
    #[arg(long)]
    pub once: bool,
}

/// A process's place in a group, as schedulers describe it: `WORLD_SIZE` and `RANK` (or an
/// indexed Job's `JOB_COMPLETION_INDEX`).
///
/// Rank 0 is the trainer; every other rank serves its devices on `0.0.0.0:$MASTER_PORT`, so
/// one command line works for every process of the group. Burn's trainer dials its workers (the
/// reverse of torchrun, where every rank dials `MASTER_ADDR`), so the trainer finds rank `r` by
/// a template such as `ws://resnet-train-{rank}.resnet-train:29500`; `MASTER_ADDR` is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduler {
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// Number of processes in the group.
    pub world_size: usize,
}

impl Scheduler {
    /// The group the environment describes, when `WORLD_SIZE` is set (without it, `RANK` and
    /// `JOB_COMPLETION_INDEX` are ignored: an indexed Job of independent runs, such as a
    /// sweep, has a completion index but is no group).
    pub fn from_env() -> Result<Option<Scheduler>> {
        Scheduler::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Scheduler::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Scheduler>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .filter(|value| !value.trim().is_empty())
                .map(|value| {
                    value
                        .trim()
                        .parse::<usize>()
                        .with_context(|| format!("{name}={value} is not a whole number"))
                })
                .transpose()
        };
        let Some(world_size) = number("WORLD_SIZE")? else {
            return Ok(None);
        };
        if world_size == 0 {
            bail!("WORLD_SIZE must be at least 1");
        }
        let rank = match number("RANK")? {
            Some(rank) => rank,
            None => number("JOB_COMPLETION_INDEX")?.unwrap_or(0),
        };
        if rank >= world_size {
            bail!("RANK={rank} must be below WORLD_SIZE={world_size}");
        }
        Ok(Some(Scheduler { rank, world_size }))
    }
}

/// The workers' port: `MASTER_PORT`, or 29500.
pub fn master_port() -> Result<u16> {
    match std::env::var("MASTER_PORT") {
        Ok(port) if !port.trim().is_empty() => port
            .trim()
            .parse()
            .with_context(|| format!("MASTER_PORT={port} is not a port number")),
        _ => Ok(DEFAULT_PORT),
    }
}

/// The workers' addresses: `remote` when given, else ranks `1..world_size` through `template`
/// (`{rank}` replaced by the rank), else none.
pub fn remote_urls(
    remote: &[String],
    template: Option<&str>,
    scheduler: Option<Scheduler>,
) -> Result<Vec<String>> {
    let urls: Vec<String> = if !remote.is_empty() {
        remote.iter().map(|url| url.trim().to_string()).collect()
    } else {
        match scheduler {
            Some(group) if group.world_size > 1 => {
                let Some(template) = template else {
                    bail!(
                        "WORLD_SIZE={} but the workers' addresses are unknown: give \
                         --remote-template (or RESNET_REMOTE_TEMPLATE), e.g. \
                         ws://resnet-train-{{rank}}.resnet-train:29500",
                        group.world_size
                    );
                };
                if !template.contains("{rank}") {
                    bail!("--remote-template `{template}` has no `{{rank}}` to replace");
                }
                (1..group.world_size)
                    .map(|rank| template.replace("{rank}", &rank.to_string()))
                    .collect()
            }
            _ => Vec::new(),
        }
    };
    for url in &urls {
        let Some(rest) = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
        else {
            bail!("remote worker `{url}` is not a WebSocket address like ws://HOST:PORT");
        };
        if rest.is_empty() || rest.starts_with(':') || rest.starts_with('/') {
            bail!("remote worker `{url}` has no host");
        }
    }
    Ok(urls)
}

static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Records that a training or validation step finished (read by [`Watchdog`]).
pub fn note_progress() {
    PROGRESS.fetch_add(1, Ordering::Relaxed);
}

/// Ends the process with an error when no step finishes for a while: a remote worker on a
/// lost network can leave the trainer waiting for a reply for many minutes (TCP keeps
/// retrying). Stops watching when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    /// Watch from now on; `what` names the remote workers in the error.
    pub fn start(timeout: Duration, what: String) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let watching = stop.clone();
        std::thread::spawn(move || {
            let mut seen = PROGRESS.load(Ordering::Relaxed);
            let mut since = Instant::now();
            while !watching.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = PROGRESS.load(Ordering::Relaxed);
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() >= timeout && !watching.load(Ordering::Relaxed) {
                    eprintln!(
                        "error: no training step finished in {} s (--step-timeout); a remote \
                         worker may be unreachable: {what}",
                        timeout.as_secs()
                    );
                    std::process::exit(1);
                }
            }
        });
        Watchdog { stop }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Makes the replicas of a multi-device step start their forward passes together.
///
/// Burn 0.22 shares batch-norm running statistics between the replicas of a step, and forking
/// the model onto a remote device copies the latest values, which may be tensors another
/// replica is still computing on another server. A server-to-server copy of a tensor whose
/// creation has not reached its server yet fails the session ("Should have handle for
/// tensor"). With every replica waiting here until all have forked their copy (and each step
/// ending with a sync), no copy can race a computation.
struct Gate {
    replicas: usize,
    /// Arrived replicas, the step's generation, and whether a replica failed.
    state: std::sync::Mutex<(usize, u64, bool)>,
    turn: std::sync::Condvar,
}

static GATE: std::sync::Mutex<Option<Arc<Gate>>> = std::sync::Mutex::new(None);

/// Make every training step wait for `replicas` replicas (see [`step_gate`]); `None` removes
/// the gate. While a gate is set, any panic (such as a replica losing its remote device while
/// forking the model) releases the waiting replicas with a failure of their own, so the step
/// fails at once instead of waiting out the gate's timeout.
pub fn set_step_gate(replicas: Option<usize>) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    let gate = replicas.map(|replicas| {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                fail_step_gate();
                previous(info);
            }));
        });
        Arc::new(Gate {
            replicas,
            state: std::sync::Mutex::new((0, 0, false)),
            turn: std::sync::Condvar::new(),
        })
    });
    if let Ok(mut slot) = GATE.lock() {
        *slot = gate;
    }
}

/// Release the replicas waiting at the gate with a failure.
fn fail_step_gate() {
    let Some(gate) = GATE.try_lock().ok().and_then(|slot| slot.clone()) else {
        return;
    };
    if let Ok(mut state) = gate.state.try_lock() {
        state.2 = true;
        gate.turn.notify_all();
    }
}

/// Wait until every replica has reached this point of its step, if a gate is set.
///
/// # Panics
///
/// When the others do not arrive within `timeout` (a replica failed before its step): Burn
/// reports the panic as that replica's failure.
pub fn step_gate(timeout: Duration) {
    let Some(gate) = GATE.lock().ok().and_then(|slot| slot.clone()) else {
        return;
    };
    let Ok(mut state) = gate.state.lock() else {
        return;
    };
    let generation = state.1;
    state.0 += 1;
    if state.0 == gate.replicas {
        *state = (0, generation + 1, state.2);
        gate.turn.notify_all();
        return;
    }
    let deadline = Instant::now() + timeout;
    while state.1 == generation {
        if state.2 {
            drop(state);
            panic!("another replica failed before its step");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(state);
            panic!(
                "the other replicas did not start their step within {} s",
                timeout.as_secs()
            );
        }
        state = match gate
            .turn
            .wait_timeout(state, left.min(Duration::from_secs(1)))
        {
            Ok((state, _)) => state,
            Err(_) => return,
        };
    }
}

#[cfg(feature = "distributed")]
pub use remote::{connect, serve};

#[cfg(not(feature = "distributed"))]
/// Without the `distributed` feature: an error saying how to get it.
pub fn connect(
    _urls: &[String],
    _token: Option<&str>,
    _timeout: Duration,
) -> Result<Vec<(String, burn::tensor::Device)>> {
    bail!(
        "this resnet-train was built without remote workers: build it with `--features distributed`"
    )
}

#[cfg(not(feature = "distributed"))]
/// Without the `distributed` feature: an error saying how to get it.
pub fn serve(_args: &ServeArgs) -> Result<()> {
    bail!(
        "this resnet-train was built without remote workers: build it with `--features distributed`"
    )
}

#[cfg(feature = "distributed")]
mod remote {
    use std::collections::HashSet;
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, anyhow, bail};
    use burn::remote::{ConnectError, RemoteHost};
    use burn::server::telemetry::{DrainStatus, TelemetryEvent, TelemetryProbe};
    use burn::server::{AllowAll, RemoteServer, TokenAuthorizer, WebSocketTransport};
    use burn::tensor::Device;

    use super::{ServeArgs, master_port};
    use crate::backend::{Backend, describe};

    /// Serve the devices `args` names until Ctrl+C or SIGTERM (or, with `--once`, until the
    /// trainer leaves). Prints `listening on ws://ADDR` on stdout once clients can connect.
    pub fn serve(args: &ServeArgs) -> Result<()> {
        let backend = match args.backend {
            Some(backend) => backend,
            None => Backend::default_compiled()?,
        };
        if matches!(backend, Backend::Tch | Backend::TchCuda) {
            bail!(
                "libtorch devices cannot be served (Burn's remote server runs flex, ndarray and \
                 the CubeCL backends: cuda, wgpu, vulkan, metal)"
            );
        }
        let devices = backend.devices(&args.devices)?;
        let token = args.auth.token()?;
        let listen = match &args.listen {
            Some(listen) => listen.clone(),
            None => format!("0.0.0.0:{}", master_port()?),
        };
        let listener =
            TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
        let address = listener
            .local_addr()
            .with_context(|| format!("listening on {listen}"))?;
        let mut server = RemoteServer::new(devices.clone());
        server = match token {
            Some(token) => server.with_authorizer(
                TokenAuthorizer::new(token).map_err(|err| anyhow!("the token: {err}"))?,
            ),
            None if args.auth.no_token => {
                if !address.ip().is_loopback() {
                    eprintln!(
                        "warning: serving {address} without a token (--no-token): anyone who \
                         reaches it can run code on these devices"
                    );
                }
                server.with_authorizer(AllowAll)
            }
            None => bail!(
                "serving devices needs a token shared with the trainer: --token-file FILE or \
                 RESNET_REMOTE_TOKEN (or --no-token, on a trusted network only)"
            ),
        };
        if args.once {
            server = server.with_telemetry(exit_when_trainer_leaves());
        }
        let names: Vec<String> = devices.iter().map(|d| describe(backend, d)).collect();
        println!("listening on ws://{address} ({})", names.join(", "));
        std::io::stdout().flush().context("writing to stdout")?;
        server
            .serve(WebSocketTransport::from_listener(listener))
            .map_err(|err| anyhow!("serving devices on {address}: {err}"))
    }

    /// A telemetry probe whose watcher ends the process once sessions were opened and then
    /// none has been open for a few seconds (a trainer lists a server's devices through a short
    /// session before opening the ones it trains on).
    fn exit_when_trainer_leaves() -> TelemetryProbe {
        const GRACE: Duration = Duration::from_secs(3);
        let (probe, mut events) = TelemetryProbe::channel(1 << 16);
        std::thread::spawn(move || {
            let mut open = HashSet::new();
            let mut seen = false;
            let mut empty_since: Option<Instant> = None;
            let mut batch = Vec::new();
            loop {
                batch.clear();
                let status = events.drain_into(&mut batch);
                for event in &batch {
                    match **event {
                        TelemetryEvent::SessionOpened { session, .. } => {
                            open.insert(session);
                            seen = true;
                        }
                        TelemetryEvent::SessionClosed { session } => {
                            open.remove(&session);
                        }
                        _ => {}
                    }
                }
                if seen && open.is_empty() {
                    let since = *empty_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= GRACE {
                        eprintln!("the trainer closed its sessions; exiting");
                        std::process::exit(0);
                    }
                } else {
                    empty_since = None;
                }
                if let DrainStatus::Closed = status {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        probe
    }

    /// Every device of every worker at `urls`, labelled `URL device N`, retrying workers that
    /// are not up yet until `timeout` has passed.
    pub fn connect(
        urls: &[String],
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<(String, Device)>> {
        let deadline = Instant::now() + timeout;
        let mut devices = Vec::new();
        for url in urls {
            let mut host = RemoteHost::websocket(url);
            if let Some(token) = token {
                host = host.with_credential(token);
            }
            let served = loop {
                match host.devices() {
                    Ok(served) => break served,
                    Err(ConnectError::Unreachable { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(ConnectError::Unauthorized) => bail!(
                        "the worker at {url} refused the token: give the trainer and the workers \
                         the same --token-file or RESNET_REMOTE_TOKEN"
                    ),
                    Err(err @ ConnectError::Unreachable { .. }) => bail!(
                        "no worker answered at {url} within {} s (--connect-timeout): {err}",
                        timeout.as_secs()
                    ),
                    Err(err) => bail!("connecting to the worker at {url}: {err}"),
                }
            };
            for (index, device) in served.iter().enumerate() {
                devices.push((format!("{url} device {index}"), device.clone()));
            }
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn scheduler_reads_rank_and_world_size() -> Result<()> {
        assert_eq!(Scheduler::from_vars(vars(&[]))?, None);
        assert_eq!(
            Scheduler::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "3")]))?,
            Some(Scheduler {
                rank: 2,
                world_size: 3
            })
        );
        // An indexed Job's completion index stands in for RANK.
        assert_eq!(
            Scheduler::from_vars(vars(&[("JOB_COMPLETION_INDEX", "1"), ("WORLD_SIZE", "2")]))?,
            Some(Scheduler {
                rank: 1,
                world_size: 2
            })
        );
        assert!(Scheduler::from_vars(vars(&[("RANK", "3"), ("WORLD_SIZE", "3")])).is_err());
        assert!(Scheduler::from_vars(vars(&[("RANK", "one"), ("WORLD_SIZE", "2")])).is_err());
        // Without WORLD_SIZE there is no group (an indexed Job of independent runs).
        assert_eq!(
            Scheduler::from_vars(vars(&[("JOB_COMPLETION_INDEX", "4"), ("RANK", "4")]))?,
            None
        );
        assert!(Scheduler::from_vars(vars(&[("WORLD_SIZE", "0")])).is_err());
        Ok(())
    }

    #[test]
    fn worker_addresses_come_from_the_list_or_the_template() -> Result<()> {
        let group = Some(Scheduler {
            rank: 0,
            world_size: 3,
        });
        assert_eq!(
            remote_urls(&[], Some("ws://job-{rank}.svc:29500"), group)?,
            ["ws://job-1.svc:29500", "ws://job-2.svc:29500"]
        );
        // An explicit list wins over the template.
        assert_eq!(
            remote_urls(&["ws://a:1".into()], Some("ws://job-{rank}:1"), group)?,
            ["ws://a:1"]
        );
        assert!(remote_urls(&[], None, None)?.is_empty());
        assert!(remote_urls(&[], None, group).is_err());
        assert!(remote_urls(&[], Some("ws://job:1"), group).is_err());
        assert!(remote_urls(&["http://a:1".into()], None, None).is_err());
        assert!(remote_urls(&["ws://:1".into()], None, None).is_err());
        Ok(())
    }

    #[test]
    fn an_empty_token_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("token");
        std::fs::write(&path, "  \n")?;
        let args = TokenArgs {
            token_file: Some(path.clone()),
            no_token: false,
        };
        assert!(args.token().is_err());
        std::fs::write(&path, "s3cret\n")?;
        assert_eq!(args.token()?.as_deref(), Some("s3cret"));
        Ok(())
    }
}

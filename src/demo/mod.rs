//! `claygate demo`: a fake Clay on loopback with faults injected at run
//! time ([`fake_clay`]), claygate serving the repository's policies in front
//! of it, and optionally a narrated scenario ([`scenario`]) on a copy of
//! the policies paced for it ([`pace`]). `--fake-only` runs the fake alone.
//!
//! ```no_run
//! # async fn demo() -> Result<(), claygate::demo::DemoError> {
//! use claygate::demo::{DemoOptions, run};
//! let summary = run(DemoOptions {
//!     scenario: Some("outage".into()),
//!     ..DemoOptions::default()
//! })
//! .await?;
//! assert!(summary.nothing_lost());
//! # Ok(()) }
//! ```
//!
//! The policies' `${env:CLAY_BASE_URL}` is answered with the fake's URL by
//! the demo's own environment lookup (see [`demo_env`]); the process
//! environment is left alone.

pub mod fake_clay;
pub mod pace;
pub mod scenario;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::compile::{CompileOptions, EnvLookup};
use crate::reload::Trigger;
use crate::serve::{ServeConfig, ServeError, Server};

pub use self::fake_clay::{FakeClay, FakeStats, Faults, Outage};
pub use self::scenario::{DemoSummary, Narrator, SCENARIOS, Timings};

/// How long calls in flight get when the demo stops.
const DRAIN: Duration = Duration::from_secs(5);

/// What `claygate demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where claygate's admin API listens (default `127.0.0.1:7700`).
    pub listen: SocketAddr,
    /// Where the fake Clay listens (default `127.0.0.1:0`: a free port);
    /// its control API takes another free port on the same interface.
    pub fake_listen: SocketAddr,
    /// The data directory; a temporary one (removed at the end) when `None`.
    pub data: Option<PathBuf>,
    /// The policy directory (default `policies`).
    pub policies: PathBuf,
    /// A scenario to run (see [`SCENARIOS`]); `None` serves until Ctrl-C or SIGTERM.
    pub scenario: Option<String>,
    /// Seeds the scenario's traffic and the fake's random faults.
    pub seed: u64,
    /// The admin token (needed to listen on a non-loopback address).
    pub token: Option<String>,
    /// Phase lengths of the scenario.
    pub timings: Timings,
    /// Print the narration to standard output (it is kept in the summary either way).
    pub echo: bool,
    /// Faults the fake Clay starts with; `None`: only Clay's rate limit,
    /// seeded with `seed`. A scenario sets its own.
    pub faults: Option<Faults>,
    /// Run only the fake Clay (no claygate) until stopped.
    pub fake_only: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        DemoOptions {
            listen: SocketAddr::new(loopback, 7700),
            fake_listen: SocketAddr::new(loopback, 0),
            data: None,
            policies: PathBuf::from("policies"),
            scenario: None,
            seed: 42,
            token: None,
            timings: Timings::demo(),
            echo: true,
            faults: None,
            fake_only: false,
        }
    }
}

/// Why the demo cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No scenario of that name.
    #[error("unknown scenario `{0}` (known: {known})", known = SCENARIOS.join(", "))]
    UnknownScenario(String),
    /// The fake Clay cannot listen.
    #[error("cannot start the fake Clay on {addr}: {source}")]
    Fake {
        /// The address asked.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The scenario's copy of the policies cannot be made.
    #[error(transparent)]
    Policies(#[from] pace::PaceError),
    /// The data directory cannot be made.
    #[error("cannot create the data directory {path}: {source}", path = .path.display())]
    Data {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// claygate cannot start.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Ctrl-C, SIGTERM or SIGHUP cannot be listened for.
    #[error("cannot listen for Ctrl-C, SIGTERM or SIGHUP: {0}")]
    Signal(std::io::Error),
    /// The scenario could not run.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// Stopped by Ctrl-C or SIGTERM before the scenario ended.
    #[error("interrupted before the scenario ended")]
    Interrupted,
}

/// The environment the demo compiles the policies with: `CLAY_BASE_URL` is
/// the fake, `CLAY_API_KEY` a dummy (a real key is never sent to the
/// fake) and `ALERT_WEBHOOK_URL` empty (no real alert for demo data);
/// anything else comes from the process environment.
pub fn demo_env(fake_url: String) -> EnvLookup {
    Box::new(move |name| match name {
        "CLAY_BASE_URL" => Some(fake_url.clone()),
        "CLAY_API_KEY" => Some("demo-key".to_owned()),
        "ALERT_WEBHOOK_URL" => Some(String::new()),
        other => std::env::var(other).ok(),
    })
}

/// The data directory: the one given, or a temporary one removed on drop.
struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    fn new(given: Option<PathBuf>) -> Result<DataDir, DemoError> {
        let (path, temporary) = match given {
            Some(path) => (path, false),
            None => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let name = format!("claygate-demo-{}-{stamp:x}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path).map_err(|source| DemoError::Data {
            path: path.clone(),
            source,
        })?;
        Ok(DataDir { path, temporary })
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs the demo: starts the fake Clay, then claygate on `options.policies`
/// pointed at it, prints what to try, then runs the scenario, or serves
/// until Ctrl-C or SIGTERM (SIGHUP reloads the policies); then stops both
/// cleanly. Answers what happened.
pub async fn run(options: DemoOptions) -> Result<DemoSummary, DemoError> {
    // Installed before anything starts: a signal sent as soon as the banner
    // shows must find a handler, not the default action (which kills).
    let (stop, hangups) = signals().map_err(DemoError::Signal)?;
    run_signalled(options, stop, Some(hangups)).await
}

/// [`run`], stopped by `stop` instead of Ctrl-C or SIGTERM (an error of
/// `stop` is [`DemoError::Signal`]). Tests pass `std::future::pending()`.
pub async fn run_until<F>(options: DemoOptions, stop: F) -> Result<DemoSummary, DemoError>
where
    F: Future<Output = std::io::Result<()>>,
{
    run_signalled(options, stop, None).await
}

/// Runs until `stop`; each message on `hangups` reloads the policies.
async fn run_signalled<F>(
    options: DemoOptions,
    stop: F,
    hangups: Option<mpsc::Receiver<()>>,
) -> Result<DemoSummary, DemoError>
where
    F: Future<Output = std::io::Result<()>>,
{
    if options.fake_only {
        return run_fake_only(options, stop).await;
    }
    let demo = Demo::start(options).await?;
    let reloads = hangups.map(|rx| demo.reload_on(rx));
    let outcome = match demo.options.scenario.clone() {
        Some(name) => tokio::select! {
            result = demo.run_scenario(&name) => result,
            signal = stop => match signal {
                Ok(()) => Err(DemoError::Interrupted),
                Err(e) => Err(DemoError::Signal(e)),
            },
        },
        None => match stop.await {
            Ok(()) => {
                demo.narrator.say("stopping");
                let summary = demo.summary().await;
                scenario::print_summary(&demo.narrator, &summary);
                Ok(summary)
            }
            Err(e) => Err(DemoError::Signal(e)),
        },
    };
    if let Some(task) = reloads {
        task.abort();
    }
    let narrator = Arc::clone(&demo.narrator);
    demo.shutdown().await;
    outcome.map(|mut summary| {
        summary.transcript = narrator.lines();
        summary
    })
}

/// `claygate demo --fake-only`: the fake Clay alone, until `stop`.
async fn run_fake_only<F>(options: DemoOptions, stop: F) -> Result<DemoSummary, DemoError>
where
    F: Future<Output = std::io::Result<()>>,
{
    let narrator = Arc::new(Narrator::new(options.echo));
    let faults = start_faults(&options);
    let fake = FakeClay::start_with(
        options.fake_listen,
        SocketAddr::new(options.fake_listen.ip(), 0),
        faults,
    )
    .await
    .map_err(|source| DemoError::Fake {
        addr: options.fake_listen,
        source,
    })?;
    fake_banner(&narrator, &fake);
    let stopped = stop.await;
    narrator.say("stopping");
    let stats = fake.stats();
    fake.shutdown().await;
    stopped.map_err(DemoError::Signal)?;
    let summary = DemoSummary {
        seed: options.seed,
        elapsed_ms: u64::try_from(narrator.elapsed().as_millis()).unwrap_or(u64::MAX),
        rows: scenario::RowSummary {
            fake_rows: stats.rows,
            duplicate_deliveries: stats.duplicate_deliveries,
            ..scenario::RowSummary::default()
        },
        fake: Some(stats),
        ..DemoSummary::default()
    };
    scenario::print_summary(&narrator, &summary);
    Ok(DemoSummary {
        transcript: narrator.lines(),
        ..summary
    })
}

/// The faults the fake starts with.
fn start_faults(options: &DemoOptions) -> Faults {
    options.faults.clone().unwrap_or(Faults {
        seed: options.seed,
        ..Faults::default()
    })
}

/// A future that resolves on SIGTERM or Ctrl-C, and a channel of SIGHUPs.
fn signals() -> std::io::Result<(
    impl Future<Output = std::io::Result<()>>,
    mpsc::Receiver<()>,
)> {
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // A full channel already holds a pending reload.
                let _ = tx.try_send(());
            }
        });
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok(())
        };
        Ok((stop, rx))
    }
    #[cfg(not(unix))]
    {
        drop(tx);
        Ok((tokio::signal::ctrl_c(), rx))
    }
}

/// A running demo: the fake Clay and claygate in front of it.
pub struct Demo {
    options: DemoOptions,
    narrator: Arc<Narrator>,
    fake: FakeClay,
    server: Server,
    data: DataDir,
    /// The scenario's paced copy of the policies (removed on drop).
    copy: Option<pace::PolicyCopy>,
}

impl Demo {
    /// Starts the fake Clay, then claygate on `options.policies` pointed at
    /// it, and prints what to try. `options.scenario` is only checked here
    /// (an unknown name is refused before anything starts).
    pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
        if let Some(name) = &options.scenario
            && !SCENARIOS.contains(&name.as_str())
        {
            return Err(DemoError::UnknownScenario(name.clone()));
        }
        let narrator = Arc::new(Narrator::new(options.echo));
        let data = DataDir::new(options.data.clone())?;
        // A scenario serves its own copy, paced for a walk of a minute.
        let copy = match &options.scenario {
            Some(_) => Some(pace::copy_paced(
                &options.policies,
                &options.timings.pace(),
            )?),
            None => None,
        };
        let policies = copy
            .as_ref()
            .map_or_else(|| options.policies.clone(), |c| c.dir.clone());
        let fake = FakeClay::start_with(
            options.fake_listen,
            SocketAddr::new(options.fake_listen.ip(), 0),
            start_faults(&options),
        )
        .await
        .map_err(|source| DemoError::Fake {
            addr: options.fake_listen,
            source,
        })?;
        let server = Server::start(ServeConfig {
            policies: vec![policies],
            data: data.path.clone(),
            listen: options.listen,
            token: options.token.clone(),
            drain: DRAIN,
            compile: CompileOptions {
                env: demo_env(fake.url()),
                transport: None,
            },
            watch: true,
        })
        .await;
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                fake.shutdown().await;
                return Err(e.into());
            }
        };
        banner(&narrator, &options, &server, &fake, &data);
        Ok(Demo {
            options,
            narrator,
            fake,
            server,
            data,
            copy,
        })
    }

    /// claygate's admin API address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The fake Clay.
    pub fn fake(&self) -> &FakeClay {
        &self.fake
    }

    /// The claygate server.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// The narration so far.
    pub fn narrator(&self) -> &Narrator {
        &self.narrator
    }

    fn stage(&self) -> scenario::Stage<'_> {
        scenario::Stage {
            runtime: Arc::clone(self.server.state().runtime()),
            probes: Arc::clone(&self.server.state().shared.probes),
            fake: &self.fake,
            admin: format!("http://{}", self.server.addr()),
            seed: self.options.seed,
            timings: self.options.timings.clone(),
            narrator: Arc::clone(&self.narrator),
            reloader: self.server.state().shared.reloader.clone(),
            policies: self
                .copy
                .as_ref()
                .map_or_else(|| self.options.policies.clone(), |c| c.dir.clone()),
            paced: self
                .copy
                .as_ref()
                .map(|c| c.notes.clone())
                .unwrap_or_default(),
        }
    }

    /// Reloads the policies (forced, as `claygate serve` on SIGHUP) on each
    /// message of `hangups`, narrated, until aborted.
    fn reload_on(&self, mut hangups: mpsc::Receiver<()>) -> tokio::task::JoinHandle<()> {
        let reloader = self.server.state().shared.reloader.clone();
        let narrator = Arc::clone(&self.narrator);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(reloader) = &reloader else {
                    narrator.say("SIGHUP: this server has no policy directory to reload");
                    continue;
                };
                narrator.say("SIGHUP: reloading the policies");
                let record = reloader.reload(Trigger::Signal, true).await;
                let generation = record.generation.get(..12).unwrap_or(&record.generation);
                narrator.say(&format!(
                    "  reload {}: generation {generation} serving{}",
                    record.result.as_str(),
                    if record.errors.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; {} error(s), first: {}",
                            record.errors.len(),
                            crate::reload::problem_text(&record.errors[0])
                        )
                    }
                ));
            }
        })
    }

    /// Runs scenario `name` (see [`SCENARIOS`]) and answers its summary.
    pub async fn run_scenario(&self, name: &str) -> Result<DemoSummary, DemoError> {
        let mut summary = scenario::run(name, &self.stage()).await?;
        summary.transcript = self.narrator.lines();
        Ok(summary)
    }

    /// What happened so far, from the fake's records and the store (no
    /// scripted calls to count): for a demo that only served.
    pub async fn summary(&self) -> DemoSummary {
        let mut summary = scenario::interactive_summary(&self.stage()).await;
        summary.transcript = self.narrator.lines();
        summary
    }

    /// Stops claygate (draining calls in flight), then the fake; removes a
    /// temporary data directory.
    pub async fn shutdown(self) {
        let Demo {
            narrator,
            fake,
            server,
            data,
            copy,
            ..
        } = self;
        let drained = server.shutdown().await;
        fake.shutdown().await;
        narrator.say(&format!(
            "stopped (calls finished during the drain: {}, interrupted: {})",
            drained.finished, drained.interrupted
        ));
        drop(data);
        drop(copy);
    }
}

/// `curl` lines against the real addresses.
fn banner(
    narrator: &Narrator,
    options: &DemoOptions,
    server: &Server,
    fake: &FakeClay,
    data: &DataDir,
) {
    let admin = server.addr();
    let control = fake.control_addr();
    let auth = if options.token.is_some() {
        " -H \"Authorization: Bearer $CLAYGATE_ADMIN_TOKEN\""
    } else {
        ""
    };
    let operations = server.state().runtime().compiled().operations.len();
    let data_note = if data.temporary { " (temporary)" } else { "" };
    let invoke = |op: &str, params: &str| {
        format!(
            "  curl -s -X POST {admin}/v1/operations/{op}/invoke{auth} -H 'content-type: application/json' -d '{params}'"
        )
    };
    let copy_note = if options.scenario.is_some() {
        " (a copy paced for the scenario)"
    } else {
        ""
    };
    let mut lines = vec![
        "claygate demo".to_owned(),
        format!(
            "  fake Clay   {}  (control API: http://{control}/_fake/faults, /_fake/stats, /_fake/rows, /_fake/reset)",
            fake.url()
        ),
        format!(
            "  claygate    http://{admin}  ({operations} operations from {}{copy_note}, data in {}{data_note})",
            display(&options.policies),
            display(&data.path)
        ),
        "  CLAY_BASE_URL points at the fake through the demo's own environment lookup".to_owned(),
    ];
    if options.faults.is_some() {
        lines.push(format!(
            "  faults in force: {}",
            serde_json::to_string(&fake.faults()).unwrap_or_default()
        ));
    }
    lines.extend([
        String::new(),
        "Call Clay through claygate:".to_owned(),
        invoke("lookup_company", r#"{"domain":"acme.com"}"#),
        invoke("enrich_person", r#"{"email":"ada.lovelace@acme.com"}"#),
        invoke("enrich_company", r#"{"domain":"globex.com"}"#),
        invoke(
            "push_row",
            r#"{"table_id":"tbl_demo_signups","row":{"email":"ada.lovelace@acme.com","plan":"pro"}}"#,
        ),
        "Watch it:".to_owned(),
        format!("  curl -s {admin}/health"),
        format!("  curl -s {admin}/v1/breakers{auth}"),
        format!("  curl -s {admin}/v1/dlq{auth}"),
        format!("  curl -s {admin}/metrics"),
        "Break Clay (PUT replaces the faults, PATCH changes some; {} clears them):".to_owned(),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"outage\":\"refuse\"}}'    # connections refused"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"outage\":\"hang\"}}'      # accepted, never answered"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"error_rate\":0.5}}'       # half the calls answer 500/502/503"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"storm_429\":1,\"retry_after_s\":5}}'"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"latency_ms\":300,\"jitter_ms\":200,\"slow_rate\":0.2,\"slow_ms\":6000}}'"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{\"error_rate\":0.8,\"recovery\":{{\"step\":0.2,\"every_ms\":5000}}}}'"
        ),
        format!(
            "  curl -s -X PUT {control}/_fake/faults -d '{{}}'                     # all clear"
        ),
        format!("  curl -s {control}/_fake/stats"),
        if options.scenario.is_some() {
            "Ctrl-C stops the scenario.".to_owned()
        } else {
            format!(
                "Edit the files in {} to see them reload (or send SIGHUP). Ctrl-C stops.",
                display(&options.policies)
            )
        },
    ]);
    for line in lines {
        narrator.plain(&line);
    }
}

/// What `--fake-only` prints: the fake's URLs and how to use them.
fn fake_banner(narrator: &Narrator, fake: &FakeClay) {
    let url = fake.url();
    let control = fake.control_url();
    let lines = [
        "claygate demo --fake-only".to_owned(),
        format!("  fake Clay   {url}"),
        format!(
            "  control API {control}/_fake/faults  (also /_fake/stats, /_fake/rows, /_fake/reset)"
        ),
        format!(
            "  faults in force: {}",
            serde_json::to_string(&fake.faults()).unwrap_or_default()
        ),
        String::new(),
        "Point claygate at it:".to_owned(),
        format!("  CLAY_BASE_URL={url} CLAY_API_KEY=demo-key claygate serve --policies policies"),
        "Call it directly:".to_owned(),
        format!("  curl -s {url}/v1/companies/acme.com -H 'Authorization: Bearer demo-key'"),
        "Break it (PUT replaces the faults, PATCH changes some):".to_owned(),
        format!("  curl -s -X PUT {control}/_fake/faults -d '{{\"outage\":\"refuse\"}}'"),
        format!("  curl -s -X PATCH {control}/_fake/faults -d '{{\"error_rate\":0.5}}'"),
        "Ctrl-C stops.".to_owned(),
    ];
    for line in lines {
        narrator.plain(&line);
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

//! `claygate serve`: load and compile the policies, open the store, start
//! the workers (redrive, probes, policy watcher) and serve the admin API,
//! until asked to stop; then drain.
//!
//! # Shutdown
//!
//! 1. readiness fails and new invokes are refused (`draining`);
//! 2. the listener stops accepting; calls in flight get up to the drain
//!    timeout to finish;
//! 3. calls still running are interrupted: those of an operation with a DLQ
//!    are dead-lettered (never dropped), the others answer `interrupted`;
//! 4. the workers stop and the store is flushed and closed.
//!
//! A stop is clean when all of that worked; otherwise [`Server::stopped`]
//! answers a [`StopError`] and `claygate serve` exits 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AppState};
use crate::clock::Clock;
use crate::compile::CompileOptions;
use crate::health::Probes;
use crate::reload::{self, Refusal, Reloader};
use crate::runtime::{Drained, Runtime};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// How long in-flight calls get to finish at shutdown, unless configured.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// What `serve` needs.
pub struct ServeConfig {
    /// The policy directory (or files).
    pub policies: Vec<PathBuf>,
    /// The data directory (the SQLite store lives there).
    pub data: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The admin token; required unless `listen` is loopback.
    pub token: Option<String>,
    /// How long in-flight calls get at shutdown.
    pub drain: Duration,
    /// Environment and transports for compiling.
    pub compile: CompileOptions,
    /// Watch the policy directory and reload on change.
    pub watch: bool,
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without an admin token.
    #[error(
        "refusing to listen on {0} without an admin token: set CLAYGATE_ADMIN_TOKEN, or listen on a loopback address such as 127.0.0.1"
    )]
    NoToken(SocketAddr),
    /// The policies do not load, validate or compile.
    #[error("the policies cannot be served: {0}")]
    Policies(Refusal),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a stop was not clean. The calls were drained either way; what is
/// wrong is what happened around them.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The store could not write what it held and close: acknowledged
    /// work (dead letters, idempotency records) may not be on disk.
    #[error("the store could not be flushed and closed: {source}")]
    StoreFlush {
        /// What the drain did.
        drained: Drained,
        /// Why.
        source: StoreError,
    },
    /// The HTTP server failed on its own.
    #[error("the HTTP server failed: {0}")]
    Http(String),
    /// The task running the server panicked or was cancelled; the drain
    /// and the store flush may not have run.
    #[error("the server task ended abnormally: {0}")]
    Crashed(String),
}

impl StopError {
    /// What the drain did, when it ran.
    pub fn drained(&self) -> Option<Drained> {
        match self {
            StopError::StoreFlush { drained, .. } => Some(*drained),
            StopError::Http(_) | StopError::Crashed(_) => None,
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Drained, StopError>>,
}

impl Server {
    /// Starts serving `config`; answers once the listener is bound.
    pub async fn start(config: ServeConfig) -> Result<Server, ServeError> {
        if !config.listen.ip().is_loopback() && config.token.is_none() {
            return Err(ServeError::NoToken(config.listen));
        }
        let clock = Clock::new();
        let prepared = reload::prepare(&config.policies, None, &config.compile, clock.now())
            .map_err(ServeError::Policies)?;
        for w in &prepared.generation.warnings {
            tracing::warn!(file = %w.file, path = %w.path, code = ?w.code, "{}", w.message);
        }
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.data).await?);
        prepared.compiled.activate();
        let runtime = Runtime::new(prepared.compiled, Arc::clone(&store), clock);
        let reloader = Reloader::new(
            Arc::clone(&runtime),
            config.policies.clone(),
            config.compile,
            prepared.generation,
        );
        let probes = Arc::new(Probes::default());
        let state = AppState::new(
            Arc::clone(&runtime),
            Some(Arc::clone(&reloader)),
            Arc::clone(&probes),
            config.token.as_deref(),
        );
        let bound = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener.local_addr().map(|addr| (listener, addr)),
            Err(e) => Err(e),
        };
        let (listener, addr) = match bound {
            Ok(bound) => bound,
            Err(source) => {
                // Release the store (and its lock) before reporting: a
                // caller may retry on another address with the same data.
                if let Err(e) = store.close().await {
                    tracing::warn!(error = %e, "cannot close the store after a bind failure");
                }
                return Err(ServeError::Bind {
                    addr: config.listen,
                    source,
                });
            }
        };
        let (stop, stopped) = watch::channel(false);
        let mut workers = vec![crate::dlq::spawn_worker(
            Arc::clone(&runtime),
            stopped.clone(),
        )];
        workers.push(crate::health::spawn_probes(
            Arc::clone(&runtime),
            Arc::clone(&probes),
            stopped.clone(),
        ));
        if config.watch {
            workers.push(crate::watch::spawn(
                Arc::clone(&reloader),
                stopped.clone(),
                Arc::clone(&state.shared.watching),
            ));
        }
        let app = admin::router(state.clone());
        let drain = config.drain;
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            let mut shutdown = stopped.clone();
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            });
            let server = tokio::spawn(async move { serve.await });
            let mut stopping = stopped.clone();
            let _ = stopping.wait_for(|s| *s).await;
            task_state.shared.draining.store(true, Ordering::Release);
            tracing::info!(drain = ?drain, "shutting down: draining calls in flight");
            let drained = task_state.runtime().drain(drain).await;
            // Connections idle or finished by now; a stuck one must not hold
            // the process (its call already ended above).
            let http = match tokio::time::timeout(Duration::from_secs(2), server).await {
                Err(_) => {
                    tracing::warn!("connections still open after the drain; closing them");
                    Ok(())
                }
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(StopError::Http(e.to_string())),
                Ok(Err(e)) => Err(StopError::Http(e.to_string())),
            };
            for w in workers {
                let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
            }
            // The store is flushed whatever happened to HTTP: it holds the
            // dead letters the drain just wrote.
            let flushed = task_state.runtime().store.close().await;
            tracing::info!(
                finished = drained.finished,
                interrupted = drained.interrupted,
                "stopped"
            );
            if let Err(source) = flushed {
                tracing::error!(error = %source, "cannot flush and close the store");
                return Err(StopError::StoreFlush { drained, source });
            }
            http.map(|()| drained)
        });
        tracing::info!(
            %addr,
            operations = state.runtime().compiled().operations.len(),
            auth = state.shared.token.is_some(),
            "claygate listening"
        );
        Ok(Server {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The handlers' shared state (runtime, reloader, probes).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Begins shutdown (idempotent).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops and waits until drained and closed. A stop that was not clean
    /// is logged; [`stopped`](Self::stopped) answers it instead.
    pub async fn shutdown(self) -> Drained {
        self.stop();
        self.wait().await
    }

    /// Waits until the server has stopped (after [`stop`](Self::stop)); a
    /// stop that was not clean is logged.
    pub async fn wait(self) -> Drained {
        self.stopped().await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "claygate did not stop cleanly");
            e.drained().unwrap_or(Drained {
                finished: 0,
                interrupted: 0,
            })
        })
    }

    /// Waits until the server has stopped (after [`stop`](Self::stop));
    /// answers an error when the store could not be flushed or the server
    /// failed, so `claygate serve` can exit non-zero instead of hiding it.
    pub async fn stopped(self) -> Result<Drained, StopError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(StopError::Crashed(e.to_string())),
        }
    }
}

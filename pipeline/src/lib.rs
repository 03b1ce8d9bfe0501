//! A generic DAG engine whose nodes are cached by content.
//!
//! A [`Stage`] declares its inputs, outputs, parameters and code version; a [`Dag`] joins
//! nodes by the artifacts they read from each other. [`run`] executes what is not cached, with
//! bounded concurrency, publishing each node's outputs atomically into a content-addressed
//! [`Store`] keyed by hash(kind, code version, canonical params, input digests). [`status`] says,
//! without running anything, which nodes would rerun and why.

mod attempt;
mod dag;
mod declared;
mod digest;
mod error;
mod exec;
mod executor;
mod explain;
mod fsutil;
mod gc;
mod items;
mod lock;
mod results;
mod runlog;
mod slurm;
mod stage;
mod store;

pub use attempt::run_attempt;
pub use dag::Dag;
pub use digest::{StatCache, hash_bytes, hash_file};
pub use error::{Error, Result};
pub use exec::{NodeOutcome, RunOptions, RunSummary, Status, error_chain, first_line, resolve, run};
pub use executor::{Execution, Executor, InProcess, Job, RunEnv, Work};
pub use explain::{Freshness, NodeStatus, some_of, status};
pub use gc::{Garbage, GarbageKind, collect_garbage};
pub use items::Item;
pub use results::refresh_results;
pub use runlog::{RunOf, recent_jobs, recent_keys, write_runs};
pub use slurm::SlurmExecutor;
pub use stage::{Context, Input, Node, NodeRef, Output, Pending, Resources, Stage, StageError};
pub use store::{Manifest, Store};

//! Training: batches, the loop, optimizer and schedule, checkpoints, run logs, metrics.
pub mod adalora;
pub mod batch;
pub mod callbacks;
pub mod checkpoint;
pub mod interrupt;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod preference;
pub mod schedule;
pub mod seq2seq;
pub mod trainer;

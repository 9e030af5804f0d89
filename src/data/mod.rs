//! Datasets, templates, tokenization and batching.
pub mod cache;
pub mod dataset;
pub mod format;
pub mod preference;
pub mod template;

//! ftscript: fine-tune large language models with short Rhai recipes, on libtorch.
pub mod api;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod env;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod init;
pub mod models;
pub mod nn;
pub mod plot;
pub mod script;
pub mod tokenizer;
pub mod train;

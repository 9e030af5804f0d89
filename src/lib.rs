//! ftscript: fine-tune large language models with short Rhai recipes, on libtorch.
pub mod api;
pub mod data;
pub mod generate;
pub mod models;
pub mod nn;
pub mod script;
pub mod tokenizer;
pub mod train;

//! GGUF, llama.cpp's model container: reading and importing into a Hugging Face directory
//! (`import`), block quantization as ggml defines it (`quants`), writing (`write`), and
//! exporting a model, its tokenizer and its LoRA adapter for llama.cpp and Ollama (`export`).
pub mod import;
pub mod quants;
pub mod write;
pub mod export;

pub use import::*;

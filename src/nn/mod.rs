//! Layers and weight files.
pub mod linear;
pub mod peft;
pub mod quant;
pub mod weights;

pub use linear::{Linear, Lora};
pub use weights::WeightSource;

//! What attention layers share: the mask kind, the per-forward inputs every layer reads (rotary
//! cos/sin and the mask, copied to each device of a split model), and the KV cache.

use tch::{Device, Tensor};

/// Which keys each query may attend to.
pub enum AttnMask {
    /// Causal over the whole row (right padding needs nothing more: labels mask the pads).
    Causal,
    /// Causal within segments: `[B, T]` ids; several packed examples share a row.
    Segments(Tensor),
    /// Causal, and only over the keys marked valid: `[B, K]` bool over the whole KV cache
    /// (left-padded prompts in batched generation).
    Padded(Tensor),
    /// Several sequences sharing a prefix in one row (a preference pair's prompt, then its two
    /// completions): `segments` `[B, T]`, 0 the prefix, seen by every later token of its row; any
    /// other segment sees the prefix and itself, causally. `positions` `[B, T]` (each sequence's
    /// own) measure a sliding window.
    SharedPrefix { segments: Tensor, positions: Tensor },
}

impl AttnMask {
    pub fn to_device(&self, d: Device) -> AttnMask {
        match self {
            AttnMask::Causal => AttnMask::Causal,
            AttnMask::Segments(s) => AttnMask::Segments(s.to_device(d)),
            AttnMask::Padded(v) => AttnMask::Padded(v.to_device(d)),
            AttnMask::SharedPrefix { segments, positions } => AttnMask::SharedPrefix { segments: segments.to_device(d), positions: positions.to_device(d) },
        }
    }
}

/// What every layer of one forward shares (rotary cos/sin tables, the attention mask), with a
/// copy on each device of a model split across GPUs. Most models have one rotary table; Gemma 3
/// has a second for its sliding-window layers.
pub struct LayerInputs {
    copies: Vec<(Device, Vec<(Tensor, Tensor)>, AttnMask)>,
}

impl LayerInputs {
    pub fn new(tables: Vec<(Tensor, Tensor)>, mask: &AttnMask) -> LayerInputs {
        let d = tables[0].0.device();
        LayerInputs { copies: vec![(d, tables, mask.to_device(d))] }
    }

    /// Rotary table `table` and the mask on `d`, copied there on first use.
    pub fn on(&mut self, d: Device, table: usize) -> (&(Tensor, Tensor), &AttnMask) {
        let i = match self.copies.iter().position(|c| c.0 == d) {
            Some(i) => i,
            None => {
                let (_, tables, mask) = &self.copies[0];
                let tables = tables.iter().map(|(cos, sin)| (cos.to_device(d), sin.to_device(d))).collect();
                let copy = (d, tables, mask.to_device(d));
                self.copies.push(copy);
                self.copies.len() - 1
            }
        };
        let (_, tables, m) = &self.copies[i];
        (&tables[table], m)
    }
}

/// Keys and values for incremental decoding, in buffers of a fixed capacity per layer
/// (`[B, kv_heads, capacity, head_dim]`), so that every decoding step has the same shapes and
/// reads and writes the same memory (what a CUDA graph replays). A forward over the prompts
/// (`at` None) writes slots `0..T` and attends to the prompts alone; a one-token step writes slot
/// `at` (`[1]` int64, on the device) and attends to the slots its [`AttnMask::Padded`] marks valid.
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
    pub at: Option<Tensor>,
}

/// One layer's part of a [`KvCache`].
#[derive(Clone, Copy)]
pub struct CacheSlot<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub at: Option<&'a Tensor>,
}

impl KvCache {
    /// Zeroed buffers for `b` rows of `capacity` positions; `layers` gives each layer's device
    /// and `(kv_heads, head_dim)`.
    pub fn new(layers: impl IntoIterator<Item = (Device, i64, i64)>, b: i64, capacity: i64, kind: tch::Kind) -> KvCache {
        let zeros = |d, h, hd| Tensor::zeros([b, h, capacity, hd], (kind, d));
        KvCache { layers: layers.into_iter().map(|(d, h, hd)| (zeros(d, h, hd), zeros(d, h, hd))).collect(), at: None }
    }

    /// Layer `l`'s buffers and where this forward writes.
    pub fn slot(&self, l: usize) -> CacheSlot<'_> {
        let (k, v) = &self.layers[l];
        CacheSlot { k, v, at: self.at.as_ref() }
    }
}

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

/// Keys and values seen so far, per layer, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.size()[2]).unwrap_or(0)
    }
}

//! Micro-batches: which examples go together each epoch, and how they become tensors
//! (right padding, or packing several examples into one row with attention kept within each).

use crate::data::format::Example;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::Tensor;

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub max_length: usize,
    /// Pad every row to `max_length` instead of the longest row of the batch.
    pub pad_to_max_length: bool,
    /// Round each batch's width up to a multiple of this (1: as it is), as transformers'
    /// collators' `pad_to_multiple_of`: fewer shapes, each of which cuDNN's attention plans once
    /// (~82 ms a new length on an H100).
    pub pad_to_multiple_of: usize,
    /// Concatenate examples into rows of `max_length` tokens.
    pub packing: bool,
    pub pad_id: i64,
    pub shuffle: bool,
    pub seed: u64,
}

impl BatchConfig {
    /// The width of a batch whose longest row has `longest` tokens.
    pub fn width(&self, longest: usize) -> usize {
        self.rounded(if self.pad_to_max_length { self.max_length.max(longest) } else { longest })
    }

    /// `width` rounded up to a multiple of `pad_to_multiple_of`.
    pub fn rounded(&self, width: usize) -> usize {
        width.next_multiple_of(self.pad_to_multiple_of.max(1))
    }
}

/// A micro-batch on the CPU. Labels are not shifted; -100 marks positions without loss.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub positions: Tensor,
    /// Example ids per position when rows are packed.
    pub segments: Option<Tensor>,
    /// Tokens that carry a loss after the shift (`labels[:, 1:] != -100`).
    pub n_label_tokens: i64,
    /// Non-padding tokens, for throughput.
    pub n_tokens: i64,
    /// `[B, T]` bool: the positions that are not padding.
    pub valid: Tensor,
}

/// A row: the examples it holds, in order.
pub type Row = Vec<usize>;

/// The rows of micro-batches for `epoch`, from the examples' token `lengths`: a seeded shuffle
/// of the examples (seed + epoch), then either one example per row, or examples packed first-fit
/// in that order into rows of `max_length`; rows are grouped `batch_size` at a time (the last
/// batch may be smaller).
pub fn plan_epoch(lengths: &[usize], cfg: &BatchConfig, epoch: usize) -> Vec<Vec<Row>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if cfg.shuffle {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    let rows: Vec<Row> = if cfg.packing {
        let mut rows = vec![];
        let mut cur: Row = vec![];
        let mut len = 0;
        for i in order {
            let n = lengths[i].min(cfg.max_length);
            if len + n > cfg.max_length && !cur.is_empty() {
                rows.push(std::mem::take(&mut cur));
                len = 0;
            }
            cur.push(i);
            len += n;
        }
        if !cur.is_empty() {
            rows.push(cur);
        }
        rows
    } else {
        order.into_iter().map(|i| vec![i]).collect()
    };
    rows.chunks(cfg.batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// Builds the tensors of one micro-batch. In packed rows the first token of every example gets
/// label -100, so no example is trained to predict the start of the next one.
pub fn collate(examples: &[Example], rows: &[Row], cfg: &BatchConfig) -> Batch {
    let mut flat: Vec<(Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>)> = vec![];
    for row in rows {
        let (mut ids, mut labels, mut pos, mut seg) = (vec![], vec![], vec![], vec![]);
        for (k, &i) in row.iter().enumerate() {
            let e = &examples[i];
            let n = e.input_ids.len().min(cfg.max_length);
            ids.extend_from_slice(&e.input_ids[..n]);
            let start = labels.len();
            labels.extend_from_slice(&e.labels[..n]);
            if cfg.packing && n > 0 {
                labels[start] = -100;
            }
            pos.extend(0..n as i64);
            seg.extend(std::iter::repeat_n(k as i64, n));
        }
        flat.push((ids, labels, pos, seg));
    }
    let longest = flat.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
    let width = cfg.width(longest);
    let (b, t) = (flat.len() as i64, width as i64);
    let (mut ids, mut labels, mut pos, mut seg) = (vec![], vec![], vec![], vec![]);
    let mut n_tokens = 0;
    let mut valid = vec![];
    for (i, l, p, s) in flat {
        let pad = width - i.len();
        n_tokens += i.len() as i64;
        valid.extend(std::iter::repeat_n(true, i.len()).chain(std::iter::repeat_n(false, pad)));
        let last_pos = p.last().copied().unwrap_or(-1);
        ids.extend(i.into_iter().chain(std::iter::repeat_n(cfg.pad_id, pad)));
        labels.extend(l.into_iter().chain(std::iter::repeat_n(-100, pad)));
        pos.extend(p.into_iter().chain((1..=pad as i64).map(|k| last_pos + k)));
        seg.extend(s.into_iter().chain(std::iter::repeat_n(-1, pad)));
    }
    let n_label_tokens = {
        let mut n = 0;
        for r in 0..b as usize {
            n += labels[r * width + 1..(r + 1) * width].iter().filter(|&&x| x != -100).count() as i64;
        }
        n
    };
    Batch {
        input_ids: Tensor::from_slice(&ids).view([b, t]),
        labels: Tensor::from_slice(&labels).view([b, t]),
        positions: Tensor::from_slice(&pos).view([b, t]),
        segments: if cfg.packing { Some(Tensor::from_slice(&seg).view([b, t])) } else { None },
        n_label_tokens,
        n_tokens,
        valid: Tensor::from_slice(&valid).view([b, t]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn ex(ids: &[i64], labels: &[i64]) -> Example {
        Example { input_ids: ids.to_vec(), labels: labels.to_vec() }
    }
    fn lens(e: &[Example]) -> Vec<usize> {
        e.iter().map(|x| x.input_ids.len()).collect()
    }
    fn cfg(packing: bool) -> BatchConfig {
        BatchConfig { batch_size: 2, max_length: 6, pad_to_max_length: false, pad_to_multiple_of: 1, packing, pad_id: 0, shuffle: false, seed: 0 }
    }

    #[test]
    fn pads_right_and_counts_label_tokens() {
        let e = vec![ex(&[5, 6, 7], &[-100, 6, 7]), ex(&[8, 9], &[8, 9])];
        let plan = plan_epoch(&lens(&e), &cfg(false), 0);
        assert_eq!(plan.len(), 1);
        let b = collate(&e, &plan[0], &cfg(false));
        assert_eq!(Vec::<i64>::try_from(b.input_ids.view([-1])).unwrap(), vec![5, 6, 7, 8, 9, 0]);
        assert_eq!(Vec::<i64>::try_from(b.labels.view([-1])).unwrap(), vec![-100, 6, 7, 8, 9, -100]);
        assert_eq!(b.n_label_tokens, 3);
    }

    #[test]
    fn pads_to_a_multiple_when_asked() {
        let e = vec![ex(&[5, 6, 7], &[-100, 6, 7]), ex(&[8, 9], &[8, 9])];
        let c = BatchConfig { pad_to_multiple_of: 4, ..cfg(false) };
        let b = collate(&e, &plan_epoch(&lens(&e), &c, 0)[0], &c);
        assert_eq!(Vec::<i64>::try_from(b.input_ids.view([-1])).unwrap(), vec![5, 6, 7, 0, 8, 9, 0, 0]);
        assert_eq!(Vec::<i64>::try_from(b.labels.view([-1])).unwrap(), vec![-100, 6, 7, -100, 8, 9, -100, -100]);
        assert_eq!(b.n_label_tokens, 3);
        assert_eq!(c.width(4), 4);
        assert_eq!(BatchConfig { pad_to_max_length: true, ..c }.width(2), 8);
    }

    #[test]
    fn packs_with_segment_starts_masked() {
        let e = vec![ex(&[1, 2, 3], &[1, 2, 3]), ex(&[4, 5], &[4, 5]), ex(&[6, 7, 8], &[6, 7, 8])];
        let plan = plan_epoch(&lens(&e), &cfg(true), 0);
        assert_eq!(plan[0], vec![vec![0, 1], vec![2]]);
        let b = collate(&e, &plan[0], &cfg(true));
        assert_eq!(Vec::<i64>::try_from(b.labels.get(0)).unwrap(), vec![-100, 2, 3, -100, 5]);
        assert_eq!(Vec::<i64>::try_from(b.positions.get(0)).unwrap(), vec![0, 1, 2, 0, 1]);
        assert_eq!(Vec::<i64>::try_from(b.segments.unwrap().get(0)).unwrap(), vec![0, 0, 0, 1, 1]);
    }

    #[test]
    fn shuffle_is_seeded() {
        let e: Vec<Example> = (0..20).map(|i| ex(&[i], &[i])).collect();
        let c = BatchConfig { shuffle: true, ..cfg(false) };
        assert_eq!(plan_epoch(&lens(&e), &c, 0), plan_epoch(&lens(&e), &c, 0));
        assert_ne!(plan_epoch(&lens(&e), &c, 0), plan_epoch(&lens(&e), &c, 1));
    }
}

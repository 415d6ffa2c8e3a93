//! Dispatch planning under the binding limit: each tensor a dispatch touches must lie within
//! a window of two adjacent chunks, and grid dimensions stay under 65535.

use super::GpuStorage;

pub const MAX_GRID: usize = 65535;

/// First chunk of a window covering elements `first ..= last` of `st`, if one exists.
pub fn window(st: &GpuStorage, first: usize, last: usize) -> Option<usize> {
    let c = first / st.chunk_elems;
    (last < (c + 2) * st.chunk_elems).then_some(c)
}

/// Splits `0..n` into consecutive ranges, each as long as possible but at most `max_len`,
/// such that `fits(start, end)` holds. `None` when a single unit does not fit.
/// `fits` must be monotone: a range that fits stays fitting when shortened.
pub fn split_ranges(n: usize, max_len: usize, fits: impl Fn(usize, usize) -> bool) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let limit = (n - start).min(max_len.max(1));
        if !fits(start, start + 1) {
            return None;
        }
        let (mut good, mut bad) = (1, limit + 1);
        let mut probe = 2;
        while probe <= limit && fits(start, start + probe) {
            good = probe;
            probe *= 2;
        }
        if probe <= limit {
            bad = probe;
        }
        while bad - good > 1 {
            let mid = (good + bad) / 2;
            if fits(start, start + mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        out.push((start, start + good));
        start += good;
    }
    Some(out)
}

/// A box of an iteration space: `start[k] .. start[k] + len[k]` on every axis.
#[derive(Clone, Debug, PartialEq)]
pub struct IterBox {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

impl IterBox {
    pub fn elems(&self) -> usize {
        self.len.iter().product()
    }
}

/// Covers `shape` with boxes that each satisfy `fits`, splitting the outermost axis first and
/// descending to inner axes only where a single outer index is too large. `None` when a single
/// element does not fit.
pub fn split_boxes(shape: &[usize], max_elems: usize, fits: &dyn Fn(&IterBox) -> bool) -> Option<Vec<IterBox>> {
    fn descend(
        shape: &[usize],
        axis: usize,
        prefix: &IterBox,
        max_elems: usize,
        fits: &dyn Fn(&IterBox) -> bool,
        out: &mut Vec<IterBox>,
    ) -> Option<()> {
        let inner: usize = shape[axis + 1..].iter().product();
        let with_range = |a: usize, b: usize| {
            let mut bx = prefix.clone();
            bx.start[axis] = a;
            bx.len[axis] = b - a;
            bx
        };
        let max_len = (max_elems / inner.max(1)).max(1);
        let ranges = if inner <= max_elems {
            split_ranges(shape[axis], max_len, |a, b| fits(&with_range(a, b)))
        } else {
            None
        };
        match ranges {
            Some(ranges) => {
                out.extend(ranges.into_iter().map(|(a, b)| with_range(a, b)));
                Some(())
            }
            None if axis + 1 < shape.len() => {
                for i in 0..shape[axis] {
                    descend(shape, axis + 1, &with_range(i, i + 1), max_elems, fits, out)?;
                }
                Some(())
            }
            None => None,
        }
    }
    let full = IterBox {
        start: vec![0; shape.len()],
        len: shape.to_vec(),
    };
    let mut out = Vec::new();
    descend(shape, 0, &full, max_elems, fits, &mut out)?;
    Some(out)
}

/// Workgroup counts for `n` one-dimensional workgroups, folded into x and y.
pub fn grid_1d(n: usize) -> [u32; 3] {
    let x = n.clamp(1, MAX_GRID);
    [x as u32, n.div_ceil(x).max(1) as u32, 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_respects_fits_and_max() {
        let r = split_ranges(10, 4, |a, b| b - a <= 3 || a >= 6).unwrap();
        assert_eq!(r, vec![(0, 3), (3, 6), (6, 10)]);
        assert!(split_ranges(3, 8, |a, b| !(a..b).contains(&1)).is_none());
    }

    #[test]
    fn split_boxes_descends_only_when_needed() {
        // At most 8 elements per box over [3, 4, 5]: rows of 5 fit one at a time.
        let boxes = split_boxes(&[3, 4, 5], 1000, &|b: &IterBox| b.elems() <= 8).unwrap();
        assert_eq!(boxes.len(), 12);
        assert!(boxes.iter().all(|b| b.len == vec![1, 1, 5]));
        let whole = split_boxes(&[3, 4, 5], 1000, &|_: &IterBox| true).unwrap();
        assert_eq!(
            whole,
            vec![IterBox {
                start: vec![0, 0, 0],
                len: vec![3, 4, 5]
            }]
        );
        assert!(split_boxes(&[2, 2], 1000, &|_: &IterBox| false).is_none());
    }
}

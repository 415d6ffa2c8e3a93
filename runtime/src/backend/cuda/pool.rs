//! The activation arena: freed device buffers are kept by (rounded) size and handed out
//! again, so a denoising loop, which allocates the same sizes every step, asks the driver
//! for memory only during its first step. Counters make that checkable.

use std::collections::HashMap;

/// Sizes are rounded up to this many bytes so that near-equal requests share buffers.
pub(crate) const GRANULE: usize = 512;

pub(crate) fn rounded(bytes: usize) -> usize {
    bytes.max(1).div_ceil(GRANULE) * GRANULE
}

/// Memory counters of a backend, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Device buffers that exist: in use or kept for reuse.
    pub device_bytes: usize,
    /// High-water mark of `device_bytes`.
    pub peak_bytes: usize,
    /// Bytes kept for reuse.
    pub cached_bytes: usize,
    /// Buffers obtained from the driver since the backend started.
    pub driver_allocations: u64,
}

/// Free buffers of type `T` by rounded size, at most `limit` bytes of them.
pub(crate) struct Pool<T> {
    free: HashMap<usize, Vec<T>>,
    stats: MemoryStats,
    limit: usize,
}

impl<T> Pool<T> {
    pub fn new(limit: usize) -> Self {
        Self {
            free: HashMap::new(),
            stats: MemoryStats::default(),
            limit,
        }
    }

    pub fn take(&mut self, bytes: usize) -> Option<T> {
        let b = self.free.get_mut(&bytes)?.pop()?;
        self.stats.cached_bytes -= bytes;
        Some(b)
    }

    /// Records a buffer just obtained from the driver.
    pub fn created(&mut self, bytes: usize) {
        self.stats.device_bytes += bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.device_bytes);
        self.stats.driver_allocations += 1;
    }

    /// Keeps a freed buffer for reuse, or hands it back (for the caller to free) when the
    /// pool is full.
    pub fn give(&mut self, bytes: usize, buffer: T) -> Option<T> {
        if self.stats.cached_bytes + bytes > self.limit {
            self.stats.device_bytes -= bytes;
            return Some(buffer);
        }
        self.stats.cached_bytes += bytes;
        self.free.entry(bytes).or_default().push(buffer);
        None
    }

    /// Starts a new high-water mark from what exists now.
    pub fn reset_peak(&mut self) {
        self.stats.peak_bytes = self.stats.device_bytes;
    }

    /// Hands every kept buffer back (to be freed by the caller), e.g. before retrying an
    /// allocation the driver refused.
    pub fn drain(&mut self) -> Vec<T> {
        self.stats.device_bytes -= self.stats.cached_bytes;
        self.stats.cached_bytes = 0;
        self.free.drain().flat_map(|(_, v)| v).collect()
    }

    pub fn stats(&self) -> MemoryStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_allocation_pattern_allocates_once() {
        let mut pool: Pool<u32> = Pool::new(1 << 20);
        let sizes = [rounded(1000), rounded(4096), rounded(1000)];
        let mut next_id = 0;
        for step in 0..3 {
            let mut live = Vec::new();
            for &s in &sizes {
                let b = pool.take(s).unwrap_or_else(|| {
                    pool.created(s);
                    next_id += 1;
                    next_id
                });
                live.push((s, b));
            }
            for (s, b) in live {
                assert_eq!(pool.give(s, b), None);
            }
            assert_eq!(pool.stats().driver_allocations, 3, "step {step} asked the driver again");
        }
        let st = pool.stats();
        assert_eq!(st.device_bytes, 2 * 1024 + 4096);
        assert_eq!(st.peak_bytes, st.device_bytes);
        assert_eq!(st.cached_bytes, st.device_bytes);
        assert_eq!(pool.drain().len(), 3);
        assert_eq!(pool.stats().device_bytes, 0);
        assert_eq!(pool.take(rounded(1000)), None);
    }

    #[test]
    fn a_full_pool_hands_buffers_back() {
        let mut pool: Pool<u32> = Pool::new(2 * GRANULE);
        for id in 0..3 {
            pool.created(GRANULE);
            let back = pool.give(GRANULE, id);
            assert_eq!(back, (id == 2).then_some(2));
        }
        assert_eq!(pool.stats().device_bytes, 2 * GRANULE);
        assert_eq!(pool.stats().peak_bytes, 3 * GRANULE);
        pool.reset_peak();
        assert_eq!(pool.stats().peak_bytes, 2 * GRANULE);
    }

    #[test]
    fn sizes_round_to_the_granule() {
        assert_eq!(rounded(0), GRANULE);
        assert_eq!(rounded(GRANULE), GRANULE);
        assert_eq!(rounded(GRANULE + 1), 2 * GRANULE);
    }
}

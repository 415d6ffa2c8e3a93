//! A minimal scoped parallel loop for the CPU backend (no thread pool dependency, and it
//! degrades to one thread where threads are unavailable, e.g. wasm32).

/// Splits `out` into pieces of `chunk` elements and calls `f(first_chunk_index, piece)`
/// for groups of consecutive pieces on all available cores.
pub fn par_chunks_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let pieces = out.len().div_ceil(chunk);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pieces.max(1));
    if threads <= 1 {
        for (i, piece) in out.chunks_mut(chunk).enumerate() {
            f(i, piece);
        }
        return;
    }
    let per_thread = pieces.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, group) in out.chunks_mut(per_thread * chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, piece) in group.chunks_mut(chunk).enumerate() {
                    f(t * per_thread + i, piece);
                }
            });
        }
    });
}

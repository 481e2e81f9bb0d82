//! Host work spread over threads: the per-sequence passes around a GPU batch (checking and
//! packing queries, checking and copying outputs) and a worker's per-sequence preparation
//! touch megabytes per step; one thread does them at one core's memory bandwidth.

/// `f` over `items` in order, on up to `threads` scoped threads (contiguous chunks; serial
/// for one thread or one item).
pub fn map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.min(items.len()).max(1);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items.chunks(per).map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>())).collect();
        parts.into_iter().flat_map(|h| h.join().expect("a worker thread panicked")).collect()
    })
}

/// `f` on each of `items` (owned: mutable slices, say), on up to `threads` scoped threads.
pub fn for_each<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    let threads = threads.min(items.len()).max(1);
    if threads == 1 {
        items.into_iter().for_each(f);
        return;
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    let mut items = items;
    std::thread::scope(|s| {
        while !items.is_empty() {
            let rest = items.split_off(per.min(items.len()));
            let chunk = std::mem::replace(&mut items, rest);
            s.spawn(move || chunk.into_iter().for_each(f));
        }
    });
}

/// Threads worth using for `bytes` of host work: one below 1 MiB, else up to 8 of the cores.
pub fn threads_for(bytes: usize) -> usize {
    if bytes < 1 << 20 { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn map_keeps_order_and_for_each_visits_everything_once() {
        let v: Vec<u32> = (0..1001).collect();
        for t in [1, 2, 3, 8, 2000] {
            assert_eq!(super::map(&v, t, |x| x * 2), v.iter().map(|x| x * 2).collect::<Vec<_>>());
            let mut out = vec![0u32; v.len()];
            super::for_each(out.iter_mut().zip(&v).collect(), t, |(o, x)| *o = x + 1);
            assert!(out.iter().zip(&v).all(|(o, x)| *o == x + 1));
        }
        assert!(super::map(&[] as &[u32], 4, |x| *x).is_empty());
    }
}

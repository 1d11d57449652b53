//! Running a fixed number of workers for one block.

use std::sync::Mutex;

/// Runs `workers` copies of `work` (each given its worker id, `0..workers`; the calling
/// thread is worker 0) and returns their results in worker order. Workers that fit in
/// rayon's global pool run there, sparing a thread spawn per block; more (engines that
/// overlap slow storage reads) get threads of their own. A panicking worker's panic is
/// resumed on the caller once the others have ended: engines that share work between
/// workers must make the others stop when one unwinds (see `block_stm::HaltOnPanic`).
pub fn run<R, F>(workers: usize, work: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    let workers = workers.max(1);
    if workers == 1 {
        return vec![work(0)];
    }
    if workers <= rayon::current_num_threads() {
        let results = Mutex::new(Vec::with_capacity(workers));
        let work = &work;
        let results_ref = &results;
        rayon::scope(|scope| {
            for id in 1..workers {
                scope.spawn(move |_| {
                    let r = work(id);
                    results_ref
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((id, r));
                });
            }
            let r = work(0);
            results_ref
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((0, r));
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by_key(|(id, _)| *id);
        return results.into_iter().map(|(_, r)| r).collect();
    }
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (1..workers)
            .map(|id| scope.spawn(move || work(id)))
            .collect();
        let mut all = vec![work(0)];
        for handle in handles {
            all.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        all
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_in_worker_order() {
        for workers in [1, 2, 3, 40] {
            let got = super::run(workers, |id| id * 10);
            assert_eq!(got, (0..workers).map(|id| id * 10).collect::<Vec<_>>());
        }
    }
}
